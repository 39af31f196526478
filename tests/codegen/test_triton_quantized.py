"""Quantized (smoothed INT8 / FP8 Q·Kᵀ) Triton kernel against its PyTorch statement and exact attention.

The kernel is held tightly to :func:`quantized_reference` (same quantization, float32 math) and
loosely to ``attention_reference`` (the quantization error SageAttention accepts, ~1e-2).
Interpreter on CPU; fresh random inputs, NaN-poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.codegen.triton._common import fp8_supported, rel_error
from attnopt.codegen.triton.quantized import (
    quantize_blocks_triton,
    quantize_per_block,
    quantized_attention,
    quantized_reference,
    smooth_k,
)
from attnopt.replacements.exact import attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL_NATIVE = {torch.float32: 2e-3 if DEV == "cuda" else 1e-5, torch.float16: 5e-3}


def _qkv(hq, hkv, nq, nk, d, dtype):
    return (
        torch.randn(1, hq, nq, d, device=DEV, dtype=dtype),
        torch.randn(1, hkv, nk, d, device=DEV, dtype=dtype),
        torch.randn(1, hkv, nk, d, device=DEV, dtype=dtype),
    )


def _run(q, v, **kw):
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), device=q.device, dtype=v.dtype)
    quantized_attention(q, kw.pop("k"), v, out=out, **kw)
    assert not out.isnan().any(), "kernel left output elements unwritten (NaN poison survived)"
    return out


@pytest.mark.parametrize(
    "hq,hkv,nq,nk,d,causal,window,dtype",
    [
        (4, 2, 100, 100, 32, True, None, torch.float16),  # GQA, ragged tiles
        (2, 1, 50, 130, 64, True, None, torch.float32),  # Nq < Nk: bottom-right causal
        (2, 2, 96, 96, 16, False, None, torch.float16),
        (2, 1, 90, 90, 32, True, 24, torch.float32),  # window: masked left edge, unmasked middle, diagonal
        (2, 1, 90, 90, 32, True, 24, torch.float16),
    ],
)
def test_int8_matches_reference(hq, hkv, nq, nk, d, causal, window, dtype):
    q, k, v = _qkv(hq, hkv, nq, nk, d, dtype)
    out = _run(q, v, k=k, causal=causal, window=window, qk_format="int8", block_m=32, block_n=32)
    ref_q = quantized_reference(
        q, k, v, qk_format="int8", block_m=32, block_n=32, causal=causal, window=window
    )
    err_q = rel_error(out.float(), ref_q)
    assert err_q < (5e-3 if dtype == torch.float16 else 1e-4), err_q
    exact = attention_reference(q.float(), k.float(), v.float(), causal=causal, window=window)
    assert rel_error(out.float(), exact) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_native_mode_is_exact_flash(dtype):
    q, k, v = _qkv(2, 1, 70, 110, 64, dtype)
    out = _run(q, v, k=k, causal=True, window=50, qk_format="native", block_m=32, block_n=32)
    exact = attention_reference(q.float(), k.float(), v.float(), causal=True, window=50)
    assert rel_error(out.float(), exact) < TOL_NATIVE[dtype]


def test_fp8_matches_reference():
    if not fp8_supported(torch.device(DEV)):
        pytest.skip("FP8 dots need CUDA sm89+ or the interpreter")
    q, k, v = _qkv(2, 1, 64, 96, 32, torch.float16)
    out = _run(q, v, k=k, causal=True, qk_format="fp8", block_m=32, block_n=32)
    ref_q = quantized_reference(q, k, v, qk_format="fp8", block_m=32, block_n=32, causal=True)
    assert rel_error(out.float(), ref_q) < 5e-3
    exact = attention_reference(q.float(), k.float(), v.float(), causal=True)
    assert rel_error(out.float(), exact) < 1.5e-1


def test_smoothing_keeps_error_low_under_key_offsets():
    """A large per-channel offset on K (common in real models) must not blow up the INT8 error."""
    q, k, v = _qkv(2, 2, 64, 64, 32, torch.float16)
    k = k + 8.0 * torch.randn(1, 2, 1, 32, device=DEV, dtype=k.dtype)
    out = _run(q, v, k=k, causal=False, qk_format="int8", block_m=32, block_n=32)
    exact = attention_reference(q.float(), k.float(), v.float())
    assert rel_error(out.float(), exact) < 3e-2
    assert smooth_k(k).mean(dim=2).abs().max() < 1e-4


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_per_block_roundtrip(fmt):
    x = torch.randn(2, 3, 70, 16)
    xq, s = quantize_per_block(x, 32, fmt)
    assert xq.shape == x.shape and s.shape == (2, 3, 3)
    back = xq.float() * s.repeat_interleave(32, dim=2)[:, :, :70, None]
    assert rel_error(back, x) < (1e-2 if fmt == "int8" else 6e-2)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_quantization_matches_pytorch(fmt):
    """The one-pass Triton quantizer (with K smoothing) gives the PyTorch statement's values and scales."""
    if fmt == "fp8" and not fp8_supported(torch.device(DEV)):
        pytest.skip("FP8 needs CUDA sm89+ or the interpreter")
    k = torch.randn(2, 2, 70, 24, device=DEV, dtype=torch.float16) + 4.0
    xq, s = quantize_blocks_triton(k, 32, fmt, mean=k.float().mean(dim=2))
    ref_q, ref_s = quantize_per_block(smooth_k(k), 32, fmt)
    assert torch.allclose(s, ref_s, rtol=1e-6, atol=0)
    diff = (xq.float() - ref_q.float()).abs()
    if DEV == "cpu":  # interpreter: IEEE division, identical values
        assert diff.max() == 0
    else:  # approximate GPU division may move a value on a rounding boundary by one step
        assert (diff > 0).float().mean() < 1e-3


def test_reference_pieces_are_the_quantized_familys():
    """One definition: this module's PyTorch pieces are the family's (aliases, or its values in storage dtypes)."""
    qz = pytest.importorskip("attnopt.replacements.quantized")
    from attnopt.codegen.triton._common import KERNEL_QK_FORMATS, QK_FORMATS, qk_mode

    assert smooth_k is qz.smooth_keys
    assert set(KERNEL_QK_FORMATS) <= set(qz.QK_FORMATS)
    assert [qk_mode(f) for f in QK_FORMATS] == list(range(len(QK_FORMATS)))
    assert qk_mode("fp8_e4m3") == qk_mode("fp8")
    x = torch.randn(2, 2, 70, 16)
    for fmt in ("int8", "fp8"):
        xq, s = quantize_per_block(x, 32, fmt)
        vals, scales = qz.quantize_blocks(x, 32, fmt)
        assert torch.equal(xq.float(), vals) and torch.equal(s, scales)
    q, k, v = _qkv(2, 1, 40, 56, 16, torch.float32)
    cfg = qz.QuantizedConfig(qk_format="int8", pv_format="fp32", q_block=16, k_block=32)
    ref = quantized_reference(q, k, v, qk_format="int8", block_m=16, block_n=32, causal=True, window=20)
    assert torch.equal(ref, qz.quantized_reference(q, k, v, cfg, scale=16**-0.5, causal=True, window=20))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_quantizer_folds_the_scale_and_keeps_zero_blocks_at_scale_one(fmt):
    """The kernels quantize ``q * scale`` (the family's rule), and an all-zero block gets scale 1, as in PyTorch."""
    if fmt == "fp8" and not fp8_supported(torch.device(DEV)):
        pytest.skip("FP8 needs CUDA sm89+ or the interpreter")
    qz = pytest.importorskip("attnopt.replacements.quantized")
    q = torch.randn(1, 2, 96, 32, device=DEV, dtype=torch.float16)
    q[:, 1, 32:64] = 0.0
    xq, s = quantize_blocks_triton(q, 32, fmt, factor=32**-0.5)
    vals, scales = qz.quantize_blocks(q.float() * 32**-0.5, 32, fmt)
    assert s[0, 1, 1] == 1.0 and xq[0, 1, 32:64].float().abs().max() == 0
    assert torch.allclose(s, scales, rtol=1e-6, atol=0)
    diff = (xq.float() - vals).abs()
    if DEV == "cpu":  # interpreter: IEEE arithmetic, identical values
        assert diff.max() == 0
    else:  # approximate GPU division may move a value on a rounding boundary by one step
        assert (diff > 0).float().mean() < 1e-3


def test_rejects_bad_inputs():
    q, k, v = _qkv(2, 1, 32, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="block_m"):
        quantized_attention(q, k, v, block_m=24)
    with pytest.raises(TypeError, match="dtype"):
        quantized_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="qk_format"):
        quantized_attention(q, k, v, qk_format="int4")
    with pytest.raises(ValueError, match="out"):
        quantized_attention(q, k, v, out=torch.empty(1, 2, 32, 8))


def test_op_adapter_matches_portable_kernel():
    """The CUDA adapter (run here on CPU tensors) computes what the family's portable kernel computes."""
    qz = pytest.importorskip("attnopt.replacements.quantized")
    from attnopt.codegen.ops import KERNELS, AttentionCall
    from attnopt.codegen.triton.quantized import quantized_kernel

    cfg = qz.QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=32, k_block=32)
    q, k, v = _qkv(2, 1, 64, 80, 32, torch.float16)
    meta = {
        "site": "t#0",
        "family": "quantized",
        "config": cfg.to_json(),
        "mask_static": True,
        "window": None,
    }
    call = AttentionCall(q, k, v, None, [], 32**-0.5, True, None, meta)
    out = quantized_kernel(call)
    assert not out.isnan().any()
    ref = qz.quantized_reference(q, k, v, cfg, scale=32**-0.5, causal=True)
    assert rel_error(out.float(), ref.float()) < 5e-3
    if ("quantized", "cpu") in KERNELS:
        assert rel_error(out.float(), KERNELS[("quantized", "cpu")](call).float()) < 5e-3
