"""Reliability in use: concurrent models, kernels that fail at run time, runs that are stopped.

attnopt's promise is that a rewrite is either exact-to-tolerance or not made. These tests hold
it where a serving process meets it: several models in threads (one of them being planned), a
variant kernel raising on a call it was not planned for, and an ``optimize()`` interrupted or
failing part-way.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch

import attnopt
from attnopt.codegen import ops
from attnopt.codegen.memo import BoundedCache
from attnopt.replacements.shared import SharedConfig, shared_params

from .rewriter.test_backend import _SelfAttention
from .rewriter.test_export import _set_entries


def _shared_model(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model with a shared-score plan installed, its untouched copy)."""
    torch.manual_seed(seed)
    model = _SelfAttention()
    base = copy.deepcopy(model)
    attnopt.optimize(model, "1x", calib=[torch.randn(1, 8, 16)], progress=False)
    shared = SharedConfig(clusters=((0, 1), (2, 3)), representatives=(1, 2), threshold=0.9)
    _set_entries(model, {0: ("shared", shared.to_json(), shared_params(shared, 4))})
    return model, base


def _serve(model, xs, out, errors):
    try:
        with torch.no_grad():
            for x in xs:
                out.append(model(x))
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_models_served_in_threads_match_their_outputs_served_alone():
    a, _ = _shared_model(1)
    b, _ = _shared_model(2)
    xs = [torch.randn(1, 8, 16) for _ in range(12)]
    with torch.no_grad():
        alone_a, alone_b = [a(x) for x in xs], [b(x) for x in xs]
    got_a, got_b, errors = [], [], []
    threads = [threading.Thread(target=_serve, args=(m, xs, got, errors)) for m, got in ((a, got_a), (b, got_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, alone in ((got_a, alone_a), (got_b, alone_b)):
        for g, w in zip(got, alone):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_a_model_planned_in_one_thread_never_changes_what_another_serves():
    """Planning redirects operator calls (calibration observes them, validation runs variants in
    their place). Both models have the same site names; the served one must not notice."""
    served, _ = _shared_model(3)
    site = served._attnopt_plan.entries[0].site
    xs = [torch.randn(1, 8, 16) for _ in range(20)]
    with torch.no_grad():
        want = [served(x) for x in xs]
    torch.manual_seed(4)
    planned = _SelfAttention()
    to_plan = copy.deepcopy(planned)
    attnopt.optimize(planned, "1x", calib=[torch.randn(1, 8, 16)], progress=False)
    assert planned._attnopt_plan.entries[0].site == site  # the same name in both models
    stop = threading.Event()

    def redirect_while_serving():
        keep = torch.tensor([0])  # every other head of the planned model's site zeroed
        with ops.overrides({site: ("head_pruned", {}, [keep])}), torch.no_grad():
            while not stop.is_set():
                planned(torch.randn(1, 8, 16))

    planner = threading.Thread(target=redirect_while_serving)
    planner.start()
    got, errors = [], []
    try:
        _serve(served, xs, got, errors)
        calls = [torch.randn(1, 8, 16) for _ in range(3)]
        attnopt.plan(to_plan, "2x", calib=calls, progress=False, validate=True)  # planning here too
        _serve(served, xs, got, errors)
    finally:
        stop.set()
        planner.join()
    assert not errors, errors
    for g, w in zip(got, want + want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_a_variant_kernel_that_fails_at_run_time_falls_back_to_exact_once_with_a_warning(monkeypatch):
    model, base = _shared_model(5)
    site = model._attnopt_plan.entries[0].site

    def broken(call):
        raise RuntimeError("a shape this kernel was never planned for")

    monkeypatch.setitem(ops.KERNELS, ("shared", "cpu"), broken)
    monkeypatch.setattr(ops, "_FALLBACKS_WARNED", BoundedCache("test.fallbacks_warned", 16))
    x = torch.randn(1, 8, 16)
    with pytest.warns(RuntimeWarning, match=f"shared kernel failed at site {site}"), torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, base(x), rtol=1e-5, atol=1e-5)  # exact attention served it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        with torch.no_grad():
            model(torch.randn(1, 8, 16))


def test_planning_never_hides_a_failing_kernel(monkeypatch):
    """The same failure while planning is the candidate's, not exact attention's."""
    from attnopt.cost_model import make_site, make_stats
    from attnopt.cost_model.error import measure_candidate_error
    from attnopt.replacements.base import Candidate

    site = make_site(heads=4, seq=64, head_dim=16)
    stats = make_stats(site)
    shared = SharedConfig(clusters=((0, 1), (2, 3)), representatives=(1, 2), threshold=0.9)
    cand = Candidate(site.name, "shared", shared, shared_params(shared, 4))

    def broken(call):
        raise RuntimeError("broken kernel")

    monkeypatch.setitem(ops.KERNELS, ("shared", "cpu"), broken)
    with pytest.raises(RuntimeError, match="broken kernel"):
        measure_candidate_error(site, cand, stats, cache=False)


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError])
def test_an_optimize_stopped_part_way_leaves_the_model_as_it_was(monkeypatch, error):
    import attnopt.pipeline.run as run

    torch.manual_seed(6)
    model = _SelfAttention()
    forward = model.forward
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        want = model(x)

    def stopped(*args, **kwargs):
        raise error("stopped in calibration")

    monkeypatch.setattr(run, "calibrate", stopped)
    with pytest.raises(error) as info:
        attnopt.optimize(model, "2x", calib=[x, torch.randn(1, 8, 16)], progress=False)
    assert any("'calibrate' step" in n for n in getattr(info.value, "__notes__", [])) or not hasattr(
        info.value, "add_note"
    )
    assert model.forward == forward and attnopt.installed_plan(model) is None
    assert not any(k.startswith("_attnopt") for k in model.__dict__)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
