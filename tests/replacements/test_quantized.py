"""The quantized family: SageAttention semantics, error bands, and the CPU kernel against them."""

from __future__ import annotations

import json

import pytest
import torch

import attnopt.codegen.cpu.quantized as cpu_quantized
from attnopt.codegen.cpu.quantized import quantized_attention_cpu
from attnopt.codegen.ops import op_for
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import Candidate, get_family
from attnopt.replacements.exact import attention_reference
from attnopt.replacements.quantized import (
    QK_FORMAT_ALIASES,
    QK_FORMATS,
    QuantizedConfig,
    QuantizedFamily,
    block_scales,
    qk_format_name,
    quantize_blocks,
    quantize_v,
    quantized_reference,
    smooth_keys,
)

SAGE1 = QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=128, k_block=64)
FINE = QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=32, k_block=16)
FP8 = QuantizedConfig(qk_format="fp8_e4m3", pv_format="fp8_e4m3")
WIDE = QuantizedConfig(qk_format="int16", pv_format="fp32")


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def qkv(b=1, hq=4, hkv=4, nq=256, nk=256, d=64, dv=64, k_offset=0.0):
    """Fresh random inputs; ``k_offset`` adds a per-channel mean to K like real models have."""
    q = torch.randn(b, hq, nq, d)
    k = torch.randn(b, hkv, nk, d) + k_offset * torch.randn(1, hkv, 1, d)
    v = torch.randn(b, hkv, nk, dv)
    return q, k, v


def exact(q, k, v, **kw):
    return attention_reference(q.double(), k.double(), v.double(), **kw).float()


def site(**kw) -> AttentionSite:
    base = dict(
        name="m.attn#0", module_path="m.attn", index=0, pattern="sdpa", num_heads=8, num_kv_heads=2,
        head_dim=64, head_dim_v=64, q_len=512, kv_len=512, batch=1, causal=True, scale=0.125,
    )  # fmt: skip
    base.update(kw)
    return AttentionSite(**base)


# --- config -------------------------------------------------------------------------------


def test_config_round_trips_and_validates():
    for cfg in QuantizedFamily.DEFAULT_CONFIGS:
        assert QuantizedConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="qk_format"):
        QuantizedConfig(qk_format="int4")
    with pytest.raises(ValueError, match="pv_format"):
        QuantizedConfig(pv_format="bf16")
    with pytest.raises(ValueError, match="q_block"):
        QuantizedConfig(q_block=0)


# --- reference semantics ------------------------------------------------------------------


def test_quantize_blocks_is_symmetric_per_block():
    x = torch.randn(2, 3, 100, 16)
    vals, scales = quantize_blocks(x, 32, "int8")
    assert scales.shape == (2, 3, 4)
    assert torch.equal(vals, vals.round()) and vals.abs().max() <= 127
    deq = vals * scales.repeat_interleave(32, dim=-1)[..., :100, None]
    assert (deq - x).abs().max() <= scales.max() / 2 + 1e-6
    # Each block reaches the full range: its absmax maps to ±127.
    assert torch.equal(vals.reshape(2, 3, -1).abs().amax(-1), torch.full((2, 3), 127.0))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "int16"])
def test_zero_blocks_get_scale_one_and_tiny_blocks_keep_their_scale(fmt):
    """The one zero-block convention (block_scales): scale 1 where amax / qmax is 0, exact elsewhere."""
    x = torch.randn(1, 2, 96, 8)
    x[:, 0, 32:64] = 0.0  # an all-zero block
    x[:, 1, 64:] *= 1e-20  # a tiny but nonzero block: no clamp may coarsen it
    vals, scales = quantize_blocks(x, 32, fmt)
    assert scales[0, 0, 1] == 1.0 and vals[0, 0, 32:64].abs().max() == 0
    amax = x[0, 1, 64:].abs().max()
    torch.testing.assert_close(scales[0, 1, 2], amax / QK_FORMATS[fmt], rtol=1e-6, atol=0)
    assert vals[0, 1, 64:].abs().max() > QK_FORMATS[fmt] / 2  # full range used
    assert torch.equal(
        block_scales(torch.tensor([0.0, 1e-45, 2.0]), 127.0), torch.tensor([1.0, 1.0, 2.0 / 127.0])
    )
    _, v_scale = quantize_v(torch.zeros(1, 1, 4, 3), "fp8_e4m3")
    assert torch.equal(v_scale, torch.full((1, 1, 1, 3), 1.0 / 448.0))  # V channels: the same rule


def test_one_format_vocabulary_with_aliases():
    assert qk_format_name("fp8") == "fp8_e4m3" and qk_format_name("int8") == "int8"
    assert set(QK_FORMAT_ALIASES.values()) <= set(QK_FORMATS)
    x = torch.randn(1, 1, 40, 8)
    assert all(
        torch.equal(a, b) for a, b in zip(quantize_blocks(x, 16, "fp8"), quantize_blocks(x, 16, "fp8_e4m3"))
    )
    with pytest.raises(ValueError, match="Q/K format"):
        quantize_blocks(x, 16, "int4")
    with pytest.raises(ValueError, match="qk_format"):
        QuantizedConfig(qk_format="fp8")  # configs and plans store the full names only


def test_smoothing_runs_in_float32():
    k = (torch.randn(1, 2, 50, 8) + 30.0).half()
    smoothed = smooth_keys(k)
    kf = k.float()
    assert smoothed.dtype == torch.float32 and torch.equal(smoothed, kf - kf.mean(dim=-2, keepdim=True))


@pytest.mark.parametrize("causal", [False, True])
def test_wide_formats_equal_exact_attention(causal):
    q, k, v = qkv(b=2, hq=4, hkv=2, nq=200, nk=300, d=32, dv=16, k_offset=2.0)
    out = quantized_reference(q, k, v, WIDE, scale=32**-0.5, causal=causal)
    ref = exact(q, k, v, scale=32**-0.5, causal=causal)
    assert rel_l2(out, ref) < 1e-3


def test_k_smoothing_is_exact_and_leaves_inputs_alone():
    q, k, v = qkv(hq=4, hkv=4, nq=64, nk=64, d=32, k_offset=5.0)
    k_before = k.clone()
    smoothed = smooth_keys(k)
    assert torch.equal(k, k_before)
    assert smoothed.mean(dim=-2).abs().max() < 1e-4
    for causal in (False, True):
        plain = exact(q, k, v, scale=0.2, causal=causal)
        shifted = exact(q, smoothed, v, scale=0.2, causal=causal)
        assert rel_l2(shifted, plain) < 1e-6
    q_before, v_before = q.clone(), v.clone()
    quantized_reference(q, k, v, SAGE1, scale=0.2, causal=True)
    quantized_attention_cpu(q, k, v, SAGE1, scale=0.2, causal=True)
    assert torch.equal(k, k_before) and torch.equal(q, q_before) and torch.equal(v, v_before)


def test_int8_error_lands_in_sageattention_band():
    q, k, v = qkv(hq=8, hkv=8, nq=512, nk=512, d=64, k_offset=1.0)
    ref = exact(q, k, v, scale=0.125, causal=False)
    errors = {cfg: rel_l2(quantized_reference(q, k, v, cfg, scale=0.125), ref) for cfg in (SAGE1, FINE, FP8)}
    print({cfg.describe(): round(e, 5) for cfg, e in errors.items()})
    assert 0.003 < errors[SAGE1] < 0.03  # SageAttention 1 reports ~1.2-1.3% on random inputs
    assert errors[FINE] < errors[SAGE1] * 1.05
    assert errors[FP8] < 0.1


def test_smoothing_matters_when_keys_have_channel_means():
    q, k, v = qkv(hq=4, hkv=4, nq=256, nk=256, d=64, k_offset=8.0)
    ref = exact(q, k, v, scale=0.125)
    smooth = rel_l2(quantized_reference(q, k, v, SAGE1, scale=0.125), ref)
    raw = rel_l2(quantized_reference(q, k, v, QuantizedConfig(smooth_k=False), scale=0.125), ref)
    assert smooth < raw


def test_masks_apply_after_dequantisation():
    q, k, v = qkv(b=2, hq=4, hkv=2, nq=64, nk=96, d=32)
    allowed = torch.rand(2, 1, 64, 96) > 0.4
    allowed[..., 0] = True
    additive = torch.zeros(2, 1, 64, 96).masked_fill(~allowed, float("-inf"))
    out_bool = quantized_reference(q, k, v, WIDE, scale=0.2, attn_mask=allowed)
    out_add = quantized_reference(q, k, v, WIDE, scale=0.2, attn_mask=additive)
    ref = exact(q, k, v, scale=0.2, attn_mask=allowed)
    assert rel_l2(out_bool, ref) < 1e-3 and rel_l2(out_add, ref) < 1e-3


# --- the CPU kernel -----------------------------------------------------------------------

KERNEL_CASES = [
    # b, hq, hkv, nq, nk, d, dv, causal, window, mask
    (1, 4, 4, 200, 200, 64, 64, False, None, None),
    (2, 8, 2, 130, 130, 32, 16, True, None, None),
    (1, 4, 1, 50, 170, 64, 32, True, None, None),
    (1, 4, 2, 1, 77, 16, 16, True, None, None),
    (2, 4, 2, 150, 150, 32, 32, True, 40, None),
    (1, 4, 4, 90, 120, 32, 32, False, None, "bool"),
    (2, 4, 2, 100, 100, 32, 32, True, None, "additive"),
]


@pytest.mark.parametrize("cfg", [SAGE1, FINE, FP8, WIDE], ids=lambda c: c.describe())
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_cpu_kernel_matches_reference(cfg, case, monkeypatch):
    monkeypatch.setattr(cpu_quantized, "_TILE_ELEMENTS", 1 << 13)  # many query chunks
    # fixed inputs per case: fp8 Q/K/V at head dim 16 and one query lands near the 0.1 bound below
    # on some draws, so unseeded inputs made the test depend on the tests run before it
    torch.manual_seed(KERNEL_CASES.index(case))
    b, hq, hkv, nq, nk, d, dv, causal, window, mask_kind = case
    q, k, v = qkv(b, hq, hkv, nq, nk, d, dv, k_offset=1.0)
    mask = None
    if mask_kind:
        allowed = torch.rand(b, 1, nq, nk) > 0.3
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)
    kw = dict(scale=d**-0.5, causal=causal, window=window, attn_mask=mask)
    out = quantized_attention_cpu(q, k, v, cfg, **kw)
    ref = quantized_reference(q, k, v, cfg, **kw)
    tol = 2e-4 if cfg.pv_format == "fp8_e4m3" else 5e-5  # fp8 rounding may flip on fp32 ties
    assert out.shape == (b, hq, nq, dv)
    assert rel_l2(out, ref) < tol
    if mask is None:  # and the whole thing stays near exact attention
        assert rel_l2(out, exact(q, k, v, scale=d**-0.5, causal=causal, window=window)) < 0.1


def test_operator_dispatches_to_cpu_kernel():
    q, k, v = qkv(b=1, hq=4, hkv=2, nq=96, nk=96, d=32, dv=32)
    config = json.dumps(
        {
            "site": "s#0",
            "family": "quantized",
            "config": SAGE1.to_json(),
            "mask_static": False,
            "window": None,
        }
    )
    out = op_for("quantized")(q, k, v, None, [], 0.2, True, config)
    ref = quantized_reference(q, k, v, SAGE1, scale=0.2, causal=True)
    assert rel_l2(out, ref) < 5e-5


# --- the family ---------------------------------------------------------------------------


def test_family_candidates_cost_and_reference():
    family = get_family("quantized")
    s = site()
    cands = family.candidates(s, stats=None)
    assert [c.config for c in cands] == list(QuantizedFamily.DEFAULT_CONFIGS)
    shape = dict(B=1, H=8, Hkv=2, Nq=4096, Nk=4096, D=64, Dv=64, E=2)
    dense_flops, dense_bytes = get_family("exact").cost(s, None).evaluate(**shape)
    for c in cands:
        flops, nbytes = c.cost.evaluate(**shape)
        assert flops == dense_flops
        assert nbytes > 0
    q, k, v = qkv(hq=8, hkv=2, nq=64, nk=64, d=64)
    cand = Candidate(site=s.name, family="quantized", config=WIDE)
    out = family.reference(q, k, v, cand, scale=0.125, causal=True)
    assert rel_l2(out, exact(q, k, v, scale=0.125, causal=True)) < 1e-3
    with pytest.raises(TypeError, match="QuantizedConfig"):
        family.reference(
            q, k, v, Candidate(site=s.name, family="quantized", config=object()), scale=0.1, causal=False
        )
    assert family.unsupported_reason(site(rewritable=False, reason="dropout")) is not None
