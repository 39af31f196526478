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



def test_compile_backend_does_not_recompile_per_length():
    """Length-dependent choices (a variant's pay-off length, decode) are made inside the operator at run
    time, and matching reads shapes without guards, so new sequence lengths reuse dynamo's dynamic
    graph instead of compiling one per length; outputs stay right on that dynamic graph."""
    from attnopt.cost_model.plan import PlanEntry
    from attnopt.pipeline import install_plan
    from attnopt.replacements.block_sparse import BlockSparseConfig

    torch.manual_seed(7)
    model = _tiny_llama()
    base = copy.deepcopy(model)
    attnopt.optimize(model, "1x", calib=[_llama_call(32)])
    lengths = (16, 32, 40, 56, 72)

    exact_backend = attnopt.backend(plan=model._attnopt_plan)
    compiled = torch.compile(copy.deepcopy(base), backend=exact_backend)
    with torch.no_grad():
        for n in lengths:
            call = _llama_call(n)
            torch.testing.assert_close(compiled(**call).logits, base(**call).logits, rtol=1e-4, atol=1e-4)
    assert len(exact_backend.compiles) <= 2, exact_backend.compiles  # the first shape, then one dynamic graph

    plan = model._attnopt_plan
    cfg = BlockSparseConfig(mode="static", sink=1, windows=(8,), min_window=1, calib_len=32).to_json()
    plan.entries = [
        PlanEntry(site=e.site, family="block_sparse", config=cfg, decode="family", min_len=24) for e in plan.entries
    ]
    install_plan(model, plan, model._attnopt_sites)
    backend = attnopt.backend(plan=plan)
    compiled = torch.compile(copy.deepcopy(base), backend=backend)
    with torch.no_grad():
        for n in lengths:  # below and above the pay-off length
            call = _llama_call(n)
            torch.testing.assert_close(compiled(**call).logits, model(**call).logits, rtol=1e-4, atol=1e-4)
    assert len(backend.compiles) <= 2, backend.compiles
    assert all(c["rewritten"] == 2 for c in backend.compiles)


def test_compile_modes_reach_inductor_and_the_model_is_one_graph(monkeypatch):
    """``torch.compile(..., mode=...)`` hands mode/options to a custom backend: they must configure
    Inductor as without attnopt (reduce-overhead = CUDA graphs, a no-op on CPU tensors), and the
    attnopt operators must not break the graph."""
    import torch._inductor.compile_fx as cfx

    torch.manual_seed(8)
    model = _tiny_llama()
    call = _llama_call(24)
    seen = []
    real = cfx.compile_fx

    def spy(gm, example_inputs, *args, **kwargs):
        seen.append(kwargs.get("config_patches"))
        return real(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    backend = attnopt.backend()  # exact everywhere
    compiled = torch.compile(copy.deepcopy(model), backend=backend, mode="reduce-overhead")
    by_name = torch.compile(copy.deepcopy(model), backend="attnopt", options={"max_autotune": False})
    with torch.no_grad():
        want = model(**call).logits
        torch.testing.assert_close(compiled(**call).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(by_name(**call).logits, want, rtol=1e-4, atol=1e-4)
    assert len(backend.compiles) == 1 and backend.compiles[0]["rewritten"] == 2  # one graph: no breaks
    assert {"triton.cudagraphs": True} in seen and {"max_autotune": False} in seen  # (compile_fx recurses)


class _SelfAttention(torch.nn.Module):
    """One SDPA self-attention: the smallest model whose compiled graph carries a plan's tensors."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


def test_banked_plan_tensors_live_and_die_with_their_compiled_graphs():
    """The operators' parameter bank holds nothing of its own: compiling and dropping 20 models
    leaves it as it was once dynamo lets go of their graphs, and a live graph finds its tensors."""
    import gc

    from attnopt.codegen import ops

    torch.manual_seed(8)
    model = _SelfAttention()
    base = copy.deepcopy(model)
    x = torch.randn(1, 8, 16)
    attnopt.optimize(model, "1x", calib=[x])
    shared = SharedConfig(clusters=((0, 1), (2, 3)), representatives=(1, 2), threshold=0.9)
    _set_entries(model, {0: ("shared", shared.to_json(), shared_params(shared, 4))})
    plan = model._attnopt_plan
    torch._dynamo.reset()
    gc.collect()
    before = len(ops._PARAM_BANK)
    for _ in range(20):
        m = copy.deepcopy(base)
        compiled = torch.compile(m, backend=attnopt.backend(plan=plan))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))  # the shared plan, its tensors found
        assert len(ops._PARAM_BANK) > before
        del compiled, m
    torch._dynamo.reset()  # dynamo drops the compiled code it keeps per code object
    gc.collect()
    assert len(ops._PARAM_BANK) == before
