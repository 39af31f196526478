"""Rewriting graphs: graph contents, numerics, capture fallbacks, and the same-object contract."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.patterns.context import GraphContext
from attnopt.patterns.find import find_sites_in_graph
from attnopt.pipeline import run_plan
from attnopt.rewriter.capture import CaptureError, capture, capture_parts
from attnopt.rewriter.install import installed_backends
from attnopt.rewriter.rewrite import Choice, rewrite_graph


class Eager(nn.Module):
    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("method", ["export", "dynamo", "symbolic_trace"])
def test_rewrite_replaces_softmax_with_the_op_and_keeps_numerics(method):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True
    model = Eager()
    cap = capture(model, (q, k, v, mask), methods=[method])
    gm, flat = cap.graphs[0]
    sites = find_sites_in_graph(GraphContext(gm, flat))
    assert len(sites) == 1 and sites[0].mask in ("tensor", "padding") and not sites[0].mask_static
    n = rewrite_graph(gm, sites, {sites[0].name: Choice("exact")})
    assert n == 1
    targets = [str(node.target) for node in gm.graph.nodes]
    assert any("attnopt.exact" in t for t in targets)
    assert not any("softmax" in t for t in targets), targets
    gm.graph.lint()
    torch.testing.assert_close(
        gm(*flat)[0] if isinstance(gm(*flat), tuple) else gm(*flat), model(q, k, v, mask)
    )


def test_all_capture_methods_failing_names_each_one():
    class Hostile(nn.Module):
        @torch._dynamo.disable  # as if dynamo could make nothing of it
        def forward(self, x):
            if x.sum().item() > 1e9:  # data-dependent Python: no graph method can follow it
                return x
            return torch.from_numpy(x.numpy() * 2)

    with pytest.raises(CaptureError) as e:
        capture(Hostile(), (torch.randn(3),))
    for method in ("export", "dynamo", "symbolic_trace"):
        assert method in str(e.value)


def test_unknown_capture_method_is_a_value_error():
    with pytest.raises(ValueError, match="capture methods"):
        capture(Eager(), (), methods=["jit"])


def test_model_with_data_dependent_top_level_is_captured_by_parts():
    dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2
    ).eval()
    tgt, memory = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(10)
    parts = capture_parts(dec, (tgt, memory), {"tgt_mask": mask})
    assert [p.path for p in parts] == ["layers.0", "layers.1"]
    sites = attnopt.find_sites(dec, tgt, memory, tgt_mask=mask)
    assert [(s.name, s.causal, s.cross) for s in sites] == [
        ("layers.0.self_attn#0", True, False),
        ("layers.0.multihead_attn#0", False, True),
        ("layers.1.self_attn#0", True, False),
        ("layers.1.multihead_attn#0", False, True),
    ]
    reference = copy.deepcopy(dec)
    # planning runs the model with every site on attnopt's exact operator, part by part
    run_plan(dec, "1x", [((tgt, memory), {"tgt_mask": mask})], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(dec(tgt, memory, tgt_mask=mask), reference(tgt, memory, tgt_mask=mask))
    rewritten = sum(c["rewritten"] for b in installed_backends(dec).values() for c in b.compiles)
    assert rewritten == 4


def _tiny_llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_optimized_hf_model_is_the_same_object_and_still_generates(impl):
    model = _tiny_llama(impl)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 12))
    out = attnopt.optimize(model, "1x", calib=[{"input_ids": ids, "use_cache": False}])
    assert out is model and type(model).__name__ == "LlamaForCausalLM"
    prompt = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
        want = reference.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want)
        # other lengths and batch > 1 with padding
        ids2 = torch.randint(0, 64, (2, 20))
        am = torch.ones(2, 20, dtype=torch.long)
        am[1, :5] = 0
        torch.testing.assert_close(
            model(input_ids=ids2, attention_mask=am, use_cache=False).logits[1, 5:],
            reference(input_ids=ids2, attention_mask=am, use_cache=False).logits[1, 5:],
        )


def test_sdpa_top_left_causal_semantics_are_kept_when_lengths_differ():
    class TopLeft(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    model = TopLeft()
    attnopt.optimize(model, "1x", calib=[(q, k, v)])
    torch.testing.assert_close(model(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("decode", ["family", "exact"])
def test_decode_steps_run_the_decode_form_the_plan_names(decode, monkeypatch):
    """Static sink+window heads can decode over their window (StreamingLLM); the plan says so per site."""
    from attnopt.codegen import ops
    from attnopt.cost_model.plan import PlanEntry
    from attnopt.pipeline import install_plan
    from attnopt.replacements.block_sparse import BlockSparseConfig

    torch.manual_seed(5)
    model = _tiny_llama("sdpa")
    attnopt.optimize(model, "1x", calib=[{"input_ids": torch.randint(0, 64, (1, 24)), "use_cache": False}])
    cfg = BlockSparseConfig(mode="static", sink=1, windows=(3,), min_window=1, calib_len=24).to_json()
    plan = model._attnopt_plan
    plan.entries = [PlanEntry(site=e.site, family="block_sparse", config=cfg, decode=decode) for e in plan.entries]
    install_plan(model, plan, model._attnopt_sites)
    kernel = ops.KERNELS[("block_sparse", "cpu")]
    query_lengths = []

    def counting(call):
        query_lengths.append(call.q.shape[-2])
        return kernel(call)

    monkeypatch.setitem(ops.KERNELS, ("block_sparse", "cpu"), counting)
    prompt = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
        # the same sink+window semantics without a KV cache: each step a full forward
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert (1 in query_lengths) == (decode == "family")
    if decode == "family":
        assert torch.equal(got, seq)
