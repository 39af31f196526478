"""Bounded memory (issue 14.5): calibration state independent of the calibration set's size, and
no growth of attnopt's registries or of resident memory over many optimise/run/delete cycles.

No timing is asserted; the resident-memory bound is generous (64 MB over 15 cycles of models
whose weights and calibration samples are each a few MB) so allocator noise cannot fail it while
a leaked model or calibration sample per cycle would.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

import attnopt
from attnopt.codegen import ops
from attnopt.codegen.memo import BoundedCache, cache_sizes
from attnopt.cost_model import error
from attnopt.cost_model.budget import parse_budget
from attnopt.pipeline.run import run_plan
from attnopt.pipeline.validation import REFERENCE_BYTES, _error_against
from attnopt.rewriter import hf_route

from .test_reliability import _shared_model
from .zoo import by_name


def _stats_bytes(stats) -> int:
    """Bytes held by a run's calibration records (sample tensors and statistics)."""
    total = 0
    for st in stats.values():
        for t in (*st.q, *st.k, *st.v, *st.attn_mask, st.sink_mass, st.distance_mass, st.entropy, st.head_similarity):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
        total += 16 * len(st.lengths)
    return total


def _calls(entry, n: int, seq_len: int = 32):
    return [entry.inputs(seed, seq_len) for seed in range(n)]


def test_calibration_keeps_the_same_state_for_4_or_40_calls():
    entry = by_name("llama-sdpa")
    sizes = {}
    for n in (4, 40):
        model = entry.make_model().eval()
        run = run_plan(model, "2x", _calls(entry, n), measure=False, validate=False, progress=False)
        assert run.stats, "calibration recorded no site"
        assert all(st.num_calls >= n * 3 // 4 for st in run.stats.values())  # every calibration call seen
        sizes[n] = (_stats_bytes(run.stats), {k: len(st.q) for k, st in run.stats.items()})
    assert sizes[4] == sizes[40]


def test_lengths_seen_are_bounded_with_the_most_recent_last():
    from attnopt.patterns.site_stats import MAX_LENGTHS, SiteStats

    st = SiteStats(site="s")
    for n in range(1, 3 * MAX_LENGTHS):
        st.record_length(n, n)
    st.record_length(5, 5)
    assert len(st.lengths) == MAX_LENGTHS
    assert st.lengths[-1] == (5, 5) and st.lengths[-2] == (3 * MAX_LENGTHS - 1,) * 2


def test_the_held_out_check_keeps_exact_outputs_only_up_to_its_byte_bound(monkeypatch):
    """Past REFERENCE_BYTES the exact output is recomputed beside each check: same errors, bounded memory."""
    model, _ = _shared_model(7)
    calls = [((torch.randn(1, 8, 16),), {}) for _ in range(5)]
    budget = dataclasses.replace(parse_budget("2x"), metric="output_rel_error")
    site = model._attnopt_plan.entries[0].site
    table = {site: ("head_pruned", {}, [torch.tensor([0])])}
    kept_all = _error_against(model, calls, budget)(table)
    monkeypatch.setattr("attnopt.pipeline.validation.REFERENCE_BYTES", 1)
    kept_none = _error_against(model, calls, budget)(table)
    assert kept_all > 0 and kept_none == pytest.approx(kept_all, rel=1e-6)
    assert REFERENCE_BYTES == 256 << 20


def test_bounded_cache_evicts_the_least_recently_used_entry():
    c = BoundedCache("test.lru", 2)
    c["a"], c["b"] = 1, 2
    assert c.get("a") == 1  # "a" used: "b" is now the oldest
    c["c"] = 3
    assert "b" not in c and c.get("a") == 1 and c["c"] == 3 and len(c) == 2
    assert c.add("x") and not c.add("x")
    assert cache_sizes()["test.lru"] == (2, 2)


def _registries() -> dict[str, int]:
    """Sizes of attnopt's per-model registries: each must come back to where it started."""
    return {
        "param bank": len(ops._PARAM_BANK),
        "routed configs": len(hf_route._ROUTED),
        "error references": len(error._REFERENCES),
        "static mask kinds": len(ops._STATIC_MASK_KINDS),
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _cycle(entry, seed: int) -> list[weakref.ref]:
    """Optimise, run and drop one model; weak references to what must die with it."""
    torch.manual_seed(seed)
    model = entry.make_model().eval()
    attnopt.optimize(model, "2x", calib=_calls(entry, 3, 64), measure=False, progress=False)
    args, kwargs = entry.inputs(100 + seed, 64)
    with torch.no_grad():
        model(*args, **kwargs)
    refs = [weakref.ref(model), weakref.ref(model._attnopt_plan)]
    del model
    return refs


@pytest.mark.parametrize("name", ["bert-sdpa", "nanogpt"])  # routed through transformers / rewritten graph
def test_optimising_running_and_dropping_models_leaks_nothing(name):
    entry = by_name(name)
    gc.collect()
    before = _registries()
    refs = _cycle(entry, 0)
    gc.collect()
    assert all(r() is None for r in refs), "a model or its plan outlived its last reference"
    assert _registries() == before
    warm_rss = _rss_mb()
    for seed in range(1, 16):
        refs += _cycle(entry, seed)
    gc.collect()
    assert all(r() is None for r in refs), "a model or its plan outlived its last reference"
    assert _registries() == before
    for cache, (size, bound) in cache_sizes().items():
        assert size <= bound, cache
    growth = _rss_mb() - warm_rss
    assert growth < 64, f"resident memory grew {growth:.0f} MB over 15 optimise/run/delete cycles"


def test_more_models_of_one_class_than_dynamos_recompile_limit_each_run_their_plan():
    """Dynamo keeps compiled graphs per code object and stops compiling a code after 64 entries:
    had every installation compiled the class's own ``forward``, the 65th model of one class
    would no longer run its plan (PlanMismatchError). Each installation has its own entry code."""
    entry = by_name("nanogpt")
    torch.manual_seed(0)
    plan = attnopt.plan(entry.make_model().eval(), "1.5x", calib=_calls(entry, 2, 64), measure=False, progress=False)
    args, kwargs = entry.inputs(5, 64)
    limit = torch._dynamo.config.recompile_limit
    for seed in range(limit + 3):
        torch.manual_seed(seed)
        model = entry.make_model().eval()
        with torch.no_grad():
            want = model(*args, **kwargs)
            attnopt.apply(model, plan)
            got = model(*args, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        del model
