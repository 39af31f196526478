"""``torch.compile(model, backend=attnopt.backend(plan=...))``: the plan's operators under Inductor."""

from __future__ import annotations

import copy

import torch

import attnopt
from attnopt.replacements.shared import SharedConfig, shared_params

from .test_export import _llama_call, _set_entries, _tiny_llama


def test_compile_backend_runs_a_plan_with_fitted_tensors_like_optimize():
    """Inductor accepts only the buffers dynamo recorded: the plan's tensors must reach the ops anyway."""
    torch.manual_seed(6)
    model = _tiny_llama()
    base = copy.deepcopy(model)
    call = _llama_call(32)
    attnopt.optimize(model, "1x", calib=[call])
    shared = SharedConfig(clusters=((0, 1), (2, 3)), representatives=(1, 2), threshold=0.9)
    _set_entries(model, {0: ("shared", shared.to_json(), shared_params(shared, 4))})
    compiled = torch.compile(base, backend=attnopt.backend(plan=model._attnopt_plan))
    fresh = _llama_call(32)
    with torch.no_grad():
        want = model(**fresh).logits  # optimize()'s installed plan, same kernels
        got = compiled(**fresh).logits
        exact = base(**fresh).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - exact).abs().max() > 1e-3  # the shared-score plan really ran (it is not exact)
