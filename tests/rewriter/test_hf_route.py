"""Plans on Hugging Face models run through transformers' AttentionInterface, not a captured graph.

The route must compute exactly what the graph rewrite computes for the same plan, leave the
model's own forward in place (so ``torch.compile(model)`` and ``generate()`` work, head-pruned
plans included), refuse models that changed after planning, and undo itself cleanly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnopt
from attnopt.cost_model.budget import Budget
from attnopt.pipeline import install_plan, run_plan
from attnopt.rewriter.hf_route import ROUTE_NAME, route_reason, routed_sites
from attnopt.rewriter.install import installed_backends, uninstall_all

transformers = pytest.importorskip("transformers")

SEQ = 256


def _llama(impl: str = "sdpa", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ,
        attn_implementation=impl,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _calls(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (1, SEQ), generator=g), "use_cache": False} for _ in range(n)]


#: A loose tolerance and H100 predictions (deterministic latencies) so the tiny random model gets
#: variant sites to route; what is checked here is the routing, not the plan's quality.
LOOSE = Budget(speedup=4.0, max_error=10.0)


def _variant_plan(model: torch.nn.Module, families=("quantized", "block_sparse")):
    run = run_plan(model, LOOSE, _calls(3), families=families, target="h100", progress=False, validate=False)
    uninstall_all(model)
    assert any(e.family != "exact" for e in run.plan.entries), run.plan.summary()
    return run


def _logits(model: torch.nn.Module, call: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**call).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_route_computes_what_the_graph_rewrite_computes(impl: str) -> None:
    model = _llama(impl)
    run = _variant_plan(model)
    graph = copy.deepcopy(model)
    install_plan(model, run.plan, run.sites)
    install_plan(graph, run.plan, run.sites, prefer_route=False)
    # routed: the model keeps its own forward, its config names the route, no backend is installed
    assert "forward" not in model.__dict__ and not installed_backends(model)
    assert model.config._attn_implementation == ROUTE_NAME
    assert routed_sites(model) == {e.site: e.family for e in run.plan.entries}
    assert installed_backends(graph)
    for call in _calls(2, seed=5):
        torch.testing.assert_close(_logits(model, call), _logits(graph, call), rtol=1e-5, atol=1e-5)
    uninstall_all(model)
    assert model.config._attn_implementation == impl and not routed_sites(model)


def test_optimize_routes_and_exact_plans_install_nothing() -> None:
    model = _llama()
    reference = copy.deepcopy(model)
    attnopt.optimize(model, LOOSE, calib=_calls(3), families=("quantized",), target="h100", progress=False)
    assert routed_sites(model) and "forward" not in model.__dict__
    call = _calls(1, seed=9)[0]
    assert not torch.equal(_logits(model, call), _logits(reference, call))  # the plan runs

    exact = _llama()
    attnopt.optimize(exact, "1x", calib=_calls(1), progress=False)
    # "1x" costs nothing: the model's own forward and attention, untouched
    assert "forward" not in exact.__dict__ and not routed_sites(exact) and not installed_backends(exact)
    assert exact.config._attn_implementation == "sdpa"
    assert attnopt.installed_plan(exact) is not None


def test_routed_head_pruned_plan_runs_under_torch_compile() -> None:
    model = _llama(layers=2)
    reference = copy.deepcopy(model)
    run = _variant_plan(model, families=("head_pruned", "quantized"))
    plan = run.plan
    if not any(e.family == "head_pruned" for e in plan.entries):
        pytest.skip(f"the planner chose no head pruning here: {plan.summary()}")
    install_plan(model, plan, run.sites)
    call = _calls(1, seed=7)[0]
    eager_out = _logits(model, call)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(_logits(compiled, call), eager_out, rtol=1e-4, atol=1e-4)
    assert not torch.equal(eager_out, _logits(reference, call))


def test_routed_model_generates() -> None:
    model = _llama()
    run = _variant_plan(model)
    install_plan(model, run.plan, run.sites)
    ids = _calls(1)[0]["input_ids"][:, :SEQ // 2]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, SEQ // 2 + 4)


def test_a_layer_added_after_routing_is_named_at_the_next_call() -> None:
    model = _llama(layers=2)
    run = _variant_plan(model)
    install_plan(model, run.plan, run.sites)
    model(**_calls(1)[0])
    extra = copy.deepcopy(model.model.layers[1])
    extra.self_attn.__dict__.pop("_attnopt_route")
    model.model.layers.append(extra)
    model.config.num_hidden_layers = 3  # Llama runs config.num_hidden_layers of its layers
    with pytest.raises(attnopt.PlanMismatchError, match="not .*in the installed plan|is not"):
        model(**_calls(1)[0])


def test_heads_pruned_by_hand_after_routing_are_named() -> None:
    model = _llama(layers=2)
    run = _variant_plan(model)
    install_plan(model, run.plan, run.sites)
    attn = model.model.layers[0].self_attn
    keep = torch.arange(attn.head_dim * 2)  # two of four query heads, by hand
    attn.q_proj.weight.data = attn.q_proj.weight.data[keep]
    attn.q_proj.out_features = keep.numel()
    attn.o_proj.weight.data = attn.o_proj.weight.data[:, keep]
    attn.o_proj.in_features = keep.numel()
    attn.num_key_value_groups = 1
    with pytest.raises(attnopt.PlanMismatchError, match=r"model.layers.0.self_attn#0 .*num_heads 4->2"):
        model(**_calls(1)[0])


def test_models_without_the_registry_take_the_graph_path() -> None:
    class Plain(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    assert "does not dispatch" in (route_reason(torch.nn.Sequential(Plain()), ["0#0"]) or "")
    assert route_reason(_llama(), ["model.layers.0.self_attn#0"]) is None


def test_export_of_a_routed_model_rewrites_the_models_own_attention() -> None:
    model = _llama()
    run = _variant_plan(model, families=("quantized",))
    install_plan(model, run.plan, run.sites)
    call = _calls(1, seed=3)[0]
    program = attnopt.export(model, call)
    assert model.config._attn_implementation == ROUTE_NAME  # restored after exporting
    torch.testing.assert_close(program.module()(**call).logits, _logits(model, call), rtol=1e-4, atol=1e-4)


def _bert(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2 * SEQ,
        attn_implementation=impl,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _padded_calls(n: int, seed: int = 0) -> list[dict]:
    """Encoder batches of two, the second left with its last quarter padded."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n):
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, 3 * SEQ // 4 :] = 0
        calls.append({"input_ids": torch.randint(0, 64, (2, SEQ), generator=g), "attention_mask": mask})
    return calls


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_routed_encoder_with_padding_computes_what_the_graph_rewrite_computes(impl: str) -> None:
    from attnopt.cost_model.plan import PlanEntry
    from attnopt.replacements.quantized import QuantizedConfig

    model = _bert(impl)
    run = run_plan(model, "1x", _padded_calls(1), progress=False)
    uninstall_all(model)
    # INT8 attention (no fitted tensors) on layer 1: the padding mask must reach the operator
    run.plan.entries[1] = PlanEntry(site=run.sites[1].name, family="quantized", config=QuantizedConfig().to_json())
    graph = copy.deepcopy(model)
    install_plan(model, run.plan, run.sites)
    install_plan(graph, run.plan, run.sites, prefer_route=False)
    assert routed_sites(model) and installed_backends(graph)
    for call in _padded_calls(2, seed=4):
        with torch.no_grad():
            got, want = model(**call).last_hidden_state, graph(**call).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unrouting_before_the_first_call_leaves_no_pending_check() -> None:
    model = _llama()
    run = _variant_plan(model)
    install_plan(model, run.plan, run.sites)
    uninstall_all(model)  # before any call: the first-call check must go with the route
    reference = copy.deepcopy(model)
    call = _calls(1, seed=2)[0]
    torch.testing.assert_close(_logits(model, call), _logits(reference, call))
