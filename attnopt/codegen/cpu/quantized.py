"""CPU kernel of ``attnopt::quantized``: a faithful, chunked emulation of SageAttention.

The CPU has no fast INT8 GEMM in PyTorch (``torch._int_mm`` on CPU measured ~20x slower than
fp32 ``matmul`` here), so Q·Kᵀ runs as an fp32 matmul of integer-valued tensors. That is
*exact*: every product is an integer of at most 127² and every partial sum stays below 2²⁴ as
long as ``D * 127² < 2²⁴`` (D ≤ 1040), so fp32 accumulates it without rounding, exactly like
the int32 accumulator of the GPU kernel. FP8 products (3-bit mantissas) are exact in fp32 too.
Larger formats (the analysis-only ``int16``) take a float64 matmul.

Queries are processed in chunks (a multiple of ``q_block``) so the score tile is bounded;
causal and window sites only visit the keys a chunk can see. The work is the same as dense
attention plus quantisation passes, so this is slower than fp32 SDPA on a CPU — it exists to
run plans and measure error faithfully, not to win on CPU.
"""

from __future__ import annotations

import torch

from attnopt.codegen.cpu.band import mask_band_edges, visible_keys
from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.replacements.quantized import (
    QuantizedConfig,
    quantize_blocks,
    quantize_p,
    quantize_v,
    smooth_keys,
)

__all__ = ["quantized_attention_cpu", "quantized_kernel"]

#: Score elements per chunk tile (B * Hq * chunk * keys); ~8 MB of fp32 keeps tiles in cache-ish sizes.
_TILE_ELEMENTS = 1 << 21

#: Largest head dim for which fp32 accumulation of int8 products is exact (D * 127**2 < 2**24).
_EXACT_INT8_FP32_MAX_D = (1 << 24) // (127 * 127)


def _matmul_dtype(cfg: QuantizedConfig, head_dim: int) -> torch.dtype:
    """fp32 where it is exact for the format, float64 otherwise."""
    if cfg.qk_format == "fp8_e4m3":
        return torch.float32
    if cfg.qk_format == "int8" and head_dim <= _EXACT_INT8_FP32_MAX_D:
        return torch.float32
    return torch.float64


def _expand_mask(mask: torch.Tensor, b: int, hq: int, nq: int, nk: int) -> torch.Tensor:
    return mask.expand(b, hq, nq, nk)


def quantized_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: QuantizedConfig,
    *,
    scale: float,
    causal: bool,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked quantized attention; equals :func:`quantized_reference` up to fp32 rounding.

    Args and returns as :func:`attnopt.replacements.quantized.quantized_reference`.
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if hq % hkv:
        raise ValueError(f"Expected query heads divisible by key/value heads, but got {hq} and {hkv}.")
    groups = hq // hkv
    k32 = smooth_keys(k) if cfg.smooth_k else k.float()
    q_vals, q_scales = quantize_blocks(q.float() * scale, cfg.q_block, cfg.qk_format)
    k_vals, k_scales = quantize_blocks(k32, cfg.k_block, cfg.qk_format)
    mm_dtype = _matmul_dtype(cfg, d)
    q_vals, k_vals = q_vals.to(mm_dtype), k_vals.to(mm_dtype)
    # Per-token dequantisation factors: query rows (B, Hkv, G, Nq), key columns (B, Hkv, 1, Nk).
    row_scale = q_scales.repeat_interleave(cfg.q_block, dim=-1)[..., :nq].reshape(b, hkv, groups, nq)
    col_scale = k_scales.repeat_interleave(cfg.k_block, dim=-1)[..., :nk].reshape(b, hkv, 1, 1, nk)
    q_vals = q_vals.reshape(b, hkv, groups, nq, d)
    k_t = k_vals.transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, D, Nk)
    # P·V operands: V is quantised once (per-channel fp8 scales need the whole sequence).
    v_q, v_scale = quantize_v(v, cfg.pv_format)
    v_q = v_q.unsqueeze(2)  # (B, Hkv, 1, Nk, Dv)
    offset = nk - nq
    chunk = max(cfg.q_block, (_TILE_ELEMENTS // max(b * hq * nk, 1)) // cfg.q_block * cfg.q_block)
    out = q.new_empty((b, hkv, groups, nq, dv), dtype=torch.float32)
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        k_lo, k_hi = visible_keys(start, stop, offset, nk, causal=causal, window=window)
        if k_hi <= k_lo:
            out[:, :, :, start:stop] = 0.0
            continue
        scores = torch.matmul(q_vals[:, :, :, start:stop], k_t[..., k_lo:k_hi]).float()
        scores.mul_(col_scale[..., k_lo:k_hi]).mul_(row_scale[..., start:stop, None])
        if causal or window:
            mask_band_edges(scores, start, stop, k_lo, k_hi, offset, window)
        if attn_mask is not None:
            m = _expand_mask(attn_mask, b, hq, nq, nk)[:, :, start:stop, k_lo:k_hi]
            m = m.reshape(b, hkv, groups, stop - start, k_hi - k_lo)
            if m.dtype == torch.bool:
                scores.masked_fill_(~m, float("-inf"))
            else:
                scores.add_(m.float())
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max.nan_to_num_(0.0, neginf=0.0)
        p = scores.sub_(row_max).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        p = quantize_p(p, cfg.pv_format)
        acc = torch.matmul(p, v_q[..., k_lo:k_hi, :])
        if v_scale is not None:
            acc.mul_(v_scale.unsqueeze(2))
        out[:, :, :, start:stop] = torch.where(denom > 0, acc / denom.clamp_min(1e-30), 0.0)
    return out.reshape(b, hq, nq, dv)


@register_kernel("quantized", "cpu")
def quantized_kernel(call: AttentionCall) -> torch.Tensor:
    """``attnopt::quantized`` on CPU tensors (see the module docstring)."""

    cfg = call.family_config(QuantizedConfig)
    out = quantized_attention_cpu(
        call.q,
        call.k,
        call.v,
        cfg,
        scale=call.scale,
        causal=call.causal,
        window=call.window,
        attn_mask=call.attn_mask,
    )
    return out.to(call.v.dtype)
