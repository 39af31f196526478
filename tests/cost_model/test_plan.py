"""Plans: save/load round trip, fingerprints, corrupted or partial files, newer schemas, make_plan."""

from __future__ import annotations

import json

import pytest
import torch

from attnopt.cost_model import SEED_PROFILES, Budget, load_plan, make_plan, make_site, make_stats
from attnopt.cost_model.plan import PLAN_SCHEMA_VERSION, Plan, PlanEntry, fingerprint
from attnopt.replacements.base import Candidate
from attnopt.replacements.exact import ExactConfig, dense_cost
from attnopt.replacements.quantized import QuantizedConfig


def _sites(n: int = 3, heads: int = 4, seq: int = 256, head_dim: int = 32):
    return [
        make_site(f"model.layers.{i}.self_attn#0", heads=heads, seq=seq, head_dim=head_dim) for i in range(n)
    ]


def _plan(sites) -> Plan:
    entries = [
        PlanEntry(
            site=sites[0].name,
            family="quantized",
            config={"family": "quantized", "version": 1, "fields": {"qk_format": "int8", "q_block": 128}},
            params=[torch.randn(4, 32, 8), torch.randint(-128, 127, (16,), dtype=torch.int8)],
            predicted_s=1e-3,
            measured_s=1.2e-3,
            exact_predicted_s=2e-3,
            error=0.011,
            cosine=0.9999,
            notes="int8 qk",
        )
    ] + [
        PlanEntry(site=s.name, family="exact", config=ExactConfig().to_json(), predicted_s=2e-3)
        for s in sites[1:]
    ]
    return Plan(
        entries=entries,
        budget=Budget(speedup=1.5, max_error=0.02),
        device="test-device",
        target="h100",
        fingerprint=fingerprint(sites),
        sites=[s.structure() for s in sites],
        pareto=[
            {"seconds": 6e-3, "error": 0.0, "speedup": 1.0},
            {"seconds": 5e-3, "error": 0.011, "speedup": 1.2},
        ],
        totals={"exact_s": 6e-3, "planned_s": 5e-3, "speedup": 1.2, "error": 0.011},
        timings={"solve": 0.01},
        versions={"attnopt": "0.1.0"},
    )


def test_round_trip(tmp_path):
    sites = _sites()
    plan = _plan(sites)
    stats = {s.name: make_stats(s, num_samples=1) for s in sites}
    plan.save(tmp_path, stats=stats, sources={"site0.py": "# triton source"})
    for name in ("plan.json", "params.safetensors", "report.md", "pareto.png", "attention_distance.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "kernels" / "site0.py").read_text() == "# triton source"
    loaded = load_plan(tmp_path)
    assert loaded.to_json() == plan.to_json()
    for a, b in zip(loaded.entries, plan.entries):
        assert len(a.params) == len(b.params)
        for x, y in zip(a.params, b.params):
            assert x.dtype == y.dtype and torch.equal(x, y)
    loaded.check_fingerprint(sites)
    loaded.check_fingerprint({s.name: s for s in reversed(sites)})  # order does not matter
    assert "quantized" in loaded.summary() and "int8" in (tmp_path / "report.md").read_text()


def test_fingerprint_mismatch_names_the_difference(tmp_path):
    sites = _sites()
    _plan(sites).save(tmp_path)
    plan = load_plan(tmp_path)
    other = _sites(heads=8)
    with pytest.raises(ValueError, match=r"num_heads 4->8"):
        plan.check_fingerprint(other)
    with pytest.raises(ValueError, match="missing site model.layers.2"):
        plan.check_fingerprint(sites[:2])
    assert fingerprint(sites) != fingerprint(other)


def test_newer_schema_is_refused(tmp_path):
    _plan(_sites()).save(tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    data["schema_version"] = PLAN_SCHEMA_VERSION + 1
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Upgrade attnopt"):
        load_plan(tmp_path)


def test_truncated_plan_json(tmp_path):
    _plan(_sites()).save(tmp_path)
    text = (tmp_path / "plan.json").read_text()
    (tmp_path / "plan.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"plan\.json.*corrupted or truncated"):
        load_plan(tmp_path)


def test_partial_plan_json(tmp_path):
    _plan(_sites()).save(tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["entries"][1]["family"]
    del data["fingerprint"]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks \['fingerprint', 'entries\[1\]\.family'\]"):
        load_plan(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json"):
        load_plan(tmp_path)
    _plan(_sites()).save(tmp_path)
    (tmp_path / "params.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="params.safetensors"):
        load_plan(tmp_path)


def test_corrupt_params(tmp_path):
    _plan(_sites()).save(tmp_path)
    path = tmp_path / "params.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"params\.safetensors.*SHA-256"):
        load_plan(tmp_path)
    path.write_bytes(bytes(raw[:20]))
    with pytest.raises(ValueError, match="params.safetensors"):
        load_plan(tmp_path)


def test_unreadable_params_with_matching_hash(tmp_path):
    """A params file that is not safetensors at all, even with its hash recorded, is named."""
    _plan(_sites()).save(tmp_path)
    (tmp_path / "params.safetensors").write_bytes(b"not a safetensors file")
    data = json.loads((tmp_path / "plan.json").read_text())
    import hashlib

    data["files"]["params_sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="readable safetensors file"):
        load_plan(tmp_path)


def _candidates(sites, density: float, error: float):
    out = {}
    for s in sites:
        cost = dense_cost(s, density=density)
        out[s.name] = [
            Candidate(site=s.name, family="quantized", config=QuantizedConfig(), cost=cost, error=error)
        ]
    return out


def test_make_plan_from_prefilled_errors(tmp_path):
    sites = _sites(4, heads=32, seq=8192, head_dim=128)  # predicted only: H100 seed profile
    cands = _candidates(sites, density=0.15, error=0.01)
    plan = make_plan(sites, cands, "2x", profile=SEED_PROFILES["h100"], exclude=["model.layers.0.*"])
    assert plan.feasible and plan.explanation == ""
    fams = [e.family for e in plan.entries]
    assert fams[0] == "exact" and fams.count("quantized") >= 2
    assert plan.totals["speedup"] >= 2.0 * (1 - 1e-5)  # HiGHS honours bounds to ~1e-6 relative
    assert len(plan.pareto) >= 2 and plan.pareto[0]["error"] == 0.0
    assert set(plan.timings) >= {"profile", "solve", "pareto", "latency"}
    plan.save(tmp_path)
    assert load_plan(tmp_path).totals == plan.totals

    # per-site errors above SITE_ERROR_CAP rule every candidate out, so 2x cannot be reached
    broken = _candidates(sites, density=0.15, error=0.2)
    strict = make_plan(sites, broken, Budget(speedup=2.0, max_error=0.005), profile=SEED_PROFILES["h100"])
    assert not strict.feasible and all(e.family == "exact" for e in strict.entries)
    assert strict.explanation.startswith("2x needs 50% of attention time removed")

    exact = make_plan(sites, cands, "1x", profile=SEED_PROFILES["h100"])
    assert all(e.family == "exact" for e in exact.entries) and exact.totals["speedup"] == 1.0


def test_make_plan_never_chooses_unmeasured_candidates():
    sites = _sites(2)
    cands = _candidates(sites, density=0.1, error=None)
    plan = make_plan(sites, cands, Budget(max_error=0.5), profile=SEED_PROFILES["a100"], with_pareto=False)
    assert all(e.family == "exact" for e in plan.entries)


def test_candidates_no_faster_than_exact_are_not_error_scored():
    """Under measurement, a candidate slower than exact is dominated: no error runs, never chosen."""
    from attnopt.cost_model.planning import build_options
    from attnopt.replacements.base import get_family

    site = make_site("m.attn#0", heads=2, seq=256, head_dim=32, causal=True)
    st = make_stats(site, num_samples=1)
    # fp8 e4m3 attention has no CPU hardware path: its emulation is >10x slower than SDPA here
    fp8 = [c for c in get_family("quantized").candidates(site, st) if c.config.qk_format == "fp8_e4m3"]
    opts = build_options({site.name: site}, {site.name: fp8}, Budget(speedup=2.0), SEED_PROFILES["h100"],
                         stats={site.name: st}, measure="auto")  # fmt: skip
    by_family = {o.candidate.family: o for o in opts[site.name]}
    slow = by_family["quantized"]
    assert slow.measured is not None and slow.measured >= by_family["exact"].measured
    assert slow.error == float("inf") and "not scored: measured no faster than exact" in slow.candidate.notes


@pytest.mark.parametrize("end_to_end", [0.001, 0.5])
def test_out_of_reach_targets_widen_the_site_cap_only_when_end_to_end_holds(end_to_end):
    """Site errors above the cap are taken when the held-out check passes, and only then."""
    from attnopt.cost_model.planning import PlanProblem
    from attnopt.pipeline.validation import WIDEN_BISECTIONS, widen

    sites = _sites(4, heads=32, seq=8192, head_dim=128)
    cands = _candidates(sites, density=0.15, error=0.2)  # above SITE_ERROR_CAP, below the first wider cap
    budget = Budget(speedup=2.0, max_error=0.01)
    kwargs = dict(profile=SEED_PROFILES["h100"])
    plan = make_plan(sites, cands, budget, **kwargs)
    assert not plan.feasible

    def check(p):
        return end_to_end

    check.calls = 1
    got, steps = widen(PlanProblem.create(sites, cands, budget, **kwargs), plan, check)
    if end_to_end <= budget.tolerance:
        assert got.feasible and got.totals["speedup"] >= 2.0 * (1 - 1e-5)
        assert got.totals["validated_error"] == end_to_end and "per-site error cap 0.3" in steps[0]
    else:
        assert got is plan and "kept the plan above" in steps[-1] and 2 <= len(steps) <= 2 + WIDEN_BISECTIONS


def test_widening_bisects_the_speed_target_to_the_fastest_plan_that_holds():
    """A check that fails above ~1.6x: the kept plan is faster than the capped one, below the failing one."""
    from attnopt.cost_model.planning import PlanProblem
    from attnopt.pipeline.validation import widen

    sites = _sites(4, heads=32, seq=8192, head_dim=128)
    cands = {}
    for s in sites:  # a gentle and an aggressive variant per site, both above SITE_ERROR_CAP
        cands[s.name] = [
            Candidate(site=s.name, family="quantized", config=ExactConfig(), cost=dense_cost(s, density=d), error=e)
            for d, e in ((0.7, 0.2), (0.2, 0.25))
        ]
    budget = Budget(speedup=2.0, max_error=0.01)
    kwargs = dict(profile=SEED_PROFILES["h100"])
    plan = make_plan(sites, cands, budget, **kwargs)
    assert not plan.feasible and plan.totals["speedup"] == pytest.approx(1.0)

    def check(p):
        return 0.001 if p.totals["speedup"] <= 1.6 else 0.5

    check.calls = 1
    got, steps = widen(PlanProblem.create(sites, cands, budget, **kwargs), plan, check)
    assert 1.0 < got.totals["speedup"] <= 1.6 and not got.feasible
    assert got.budget == budget and "out of reach" in got.explanation and steps[-1].startswith("taken")


def test_variants_fall_back_to_exact_below_their_payoff_length():
    """A sink+window plan made at 8192 tokens runs exact attention on short contexts, where it costs more."""
    import json

    from attnopt.codegen import ops
    from attnopt.cost_model.planning import payoff_length
    from attnopt.replacements.base import get_family
    from attnopt.replacements.block_sparse import BlockSparseConfig
    from attnopt.replacements.exact import ExactFamily

    site = _sites(1, heads=32, seq=8192, head_dim=128)[0]
    fam = get_family("block_sparse")
    cfg = BlockSparseConfig(mode="static", sink=4, windows=(1024,), calib_len=8192)
    cand = Candidate(site=site.name, family="block_sparse", config=cfg, cost=fam.cost(site, cfg))
    exact = ExactFamily().candidates(site, None)[0]
    n = payoff_length(site, cand, exact, SEED_PROFILES["h100"])
    assert 1024 < n <= 8192  # a 1024-token window cannot pay off at 1024 tokens or less

    calls = []
    kernel = ops.KERNELS[("block_sparse", "cpu")]

    def counting(call):
        calls.append(call.k.shape[-2])
        return kernel(call)

    config = json.dumps({"site": "s", "family": "block_sparse", "config": BlockSparseConfig(
        mode="static", sink=1, windows=(8,), min_window=1).to_json(), "min_kv_len": 64})  # fmt: skip
    q = torch.randn(1, 2, 32, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ops.KERNELS, ("block_sparse", "cpu"), counting)
        short = ops.op_for("block_sparse")(q, q, q, None, [], 0.25, True, config)
        torch.testing.assert_close(short, ops.op_for("exact")(q, q, q, None, [], 0.25, True, "{}"))
        assert calls == []
        long = torch.randn(1, 2, 96, 16)
        ops.op_for("block_sparse")(long, long, long, None, [], 0.25, True, config)
        assert calls == [96]


def _two_speed_candidates(sites, end_to_end):
    """Per site a gentle (70% of the scores) and an aggressive (20%) variant with set end-to-end errors."""
    cands = {}
    for s in sites:
        cands[s.name] = [
            Candidate(
                site=s.name, family="quantized", config=ExactConfig(), cost=dense_cost(s, density=d),
                error=0.05, end_to_end=None if end_to_end is None else e,
            )  # fmt: skip
            for d, e in ((0.7, 0.002), (0.2, 0.004))
        ]
    return cands


def test_a_failed_check_lowers_the_bound_on_summed_end_to_end_errors():
    """Sites interact: the check sees twice the summed one-site errors. The bound on the sum is
    lowered by that shortfall and the plan re-solved, keeping variants at every site it can,
    instead of setting whole sites to exact."""
    from attnopt.cost_model.planning import PlanProblem
    from attnopt.pipeline.validation import validate_and_tighten

    sites = _sites(4, heads=32, seq=8192, head_dim=128)
    cands = _two_speed_candidates(sites, end_to_end=True)
    budget = Budget(speedup=4.0, max_error=0.015)
    kwargs = dict(profile=SEED_PROFILES["h100"], end_to_end=True)
    plan = make_plan(sites, cands, budget, **kwargs)
    assert not plan.feasible and plan.totals["error"] == pytest.approx(0.014)  # 3 aggressive + 1 gentle

    def check(p):
        return 2 * p.totals["error"]

    check.calls = 1
    got, steps = validate_and_tighten(PlanProblem.create(sites, cands, budget, **kwargs), plan, check)
    assert steps[0].endswith("re-solved with their sum bounded by 0.0075") and steps[-1].startswith("validated")
    assert got.totals["error"] <= 0.0075 + 1e-12 and got.totals["validated_error"] <= 0.015
    # the fastest plan within the lowered bound, not the initial plan minus its worst site
    best = make_plan(sites, cands, budget, max_total_error=0.0075, **kwargs)
    assert got.totals["speedup"] == pytest.approx(best.totals["speedup"])
    assert sum(e.family != "exact" for e in got.entries) >= 2


def test_a_failed_check_sets_the_worst_site_to_exact_when_planned_on_site_errors():
    from attnopt.cost_model.planning import PlanProblem
    from attnopt.pipeline.validation import validate_and_tighten

    sites = _sites(4, heads=32, seq=8192, head_dim=128)
    cands = _two_speed_candidates(sites, end_to_end=None)
    budget = Budget(speedup=2.0, max_error=0.015)
    kwargs = dict(profile=SEED_PROFILES["h100"], site_error_cap=0.1)
    plan = make_plan(sites, cands, budget, **kwargs)
    assert any(e.family != "exact" for e in plan.entries)

    def check(p):  # every variant costs 0.01 end to end: at most one may stay
        return 0.01 * sum(e.family != "exact" for e in p.entries)

    check.calls = 1
    got, steps = validate_and_tighten(PlanProblem.create(sites, cands, budget, **kwargs), plan, check)
    assert all("set to exact, re-solved" in s for s in steps[:-1]) and steps[-1].startswith("validated")
    assert sum(e.family != "exact" for e in got.entries) == 1


def test_a_plan_holding_non_finite_numbers_saves_to_one_that_loads(tmp_path):
    """Saving never writes what loading refuses: NaN/Infinity measurements are left out or null."""
    sites = _sites()
    plan = _plan(sites)
    plan.totals["speedup"] = float("inf")
    plan.timings["solve"] = float("nan")
    plan.pareto.append({"seconds": 4e-3, "error": float("inf"), "speedup": 1.5})
    plan.entries[0].cosine = float("nan")
    plan.entries[0].end_to_end = float("-inf")
    plan.save(tmp_path)
    loaded = load_plan(tmp_path)
    assert "speedup" not in loaded.totals and loaded.totals["planned_s"] == 5e-3
    assert "solve" not in loaded.timings
    assert loaded.pareto[-1] == {"seconds": 4e-3, "speedup": 1.5}
    assert loaded.entries[0].cosine is None and loaded.entries[0].end_to_end is None
    assert loaded.entries[0].error == plan.entries[0].error


def test_a_non_finite_error_is_refused_at_save_naming_the_site(tmp_path):
    sites = _sites()
    plan = _plan(sites)
    plan.save(tmp_path)
    before = (tmp_path / "plan.json").read_bytes()
    plan.entries[0].error = float("nan")
    with pytest.raises(ValueError, match=r"finite error for site 'model.layers.0.self_attn#0'"):
        plan.save(tmp_path)
    assert (tmp_path / "plan.json").read_bytes() == before  # the previous plan is untouched
    load_plan(tmp_path)
