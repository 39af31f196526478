"""CI smoke test of ``benchmarks/families.py --smoke``: every family runs end to end and is timed.

Tiny random models, N=64; results go to a temp dir. Checks structure and sanity of the numbers
(finite, exact operators reproduce the original model, every family present), never speed.
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


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_families", ROOT / "benchmarks" / "families.py")
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
