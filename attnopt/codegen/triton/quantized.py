"""Quantized flash attention: smoothed INT8 (or FP8 e4m3) Q·Kᵀ with per-block scales, P·V in V's dtype.

The semantics are the quantized family's, defined once in :mod:`attnopt.replacements.quantized`
(SageAttention's, stated exactly so the reference reproduces them bit for bit); this module
imports its pieces instead of restating them:

1. *Smooth K*: subtract K's float32 mean over all keys of each (batch, kv-head)
   (:func:`~attnopt.replacements.quantized.smooth_keys`, re-exported here as :func:`smooth_k`).
2. *Quantize per block*: ``Q * softmax_scale`` in blocks of ``block_m`` rows per (batch, head), K
   in blocks of ``block_n`` keys per (batch, kv-head), ``scale = absmax / R`` (1 for all-zero
   blocks) with ``R`` from the family's ``QK_FORMATS`` (127 for int8, round-to-nearest; 448 for
   e4m3), ``x_q = x / scale`` (:func:`~attnopt.replacements.quantized.quantize_blocks`).
3. *Attend*: ``s = (q_q · k_qᵀ) · q_scale · k_scale`` (exact int32 accumulation for int8),
   online softmax in float32, ``P`` cast to V's dtype (FP16 for fp16 models) for P·V.

:func:`quantize_blocks_triton` (one fused pass; :func:`quantize_per_block` is the family's
PyTorch statement with the kernels' storage dtypes) prepares the inputs, shared with the
sparse+quantized kernel of :mod:`.block_sparse`; :func:`quantized_reference` is the family's
reference in this module's terms, which the tests hold the kernels to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.codegen.triton import source
from attnopt.codegen.triton._common import (
    KERNEL_QK_FORMATS,
    LOG2E,
    attn_tile,
    autotune_configs,
    cdiv,
    default_scale,
    dense_tile_bounds,
    finish_rows,
    fp8_supported,
    head_block,
    load_q,
    make_out,
    portable_fallback,
    qk_mode,
    validate_qkv,
)
from attnopt.replacements.quantized import QK_FORMATS as FAMILY_QK_FORMATS
from attnopt.replacements.quantized import (
    QuantizedConfig,
    key_mean,
    qk_format_name,
    quantize_blocks,
)
from attnopt.replacements.quantized import quantized_reference as family_quantized_reference
from attnopt.replacements.quantized import smooth_keys as smooth_k

__all__ = [
    "prepare_quantized_qk",
    "quantized_kernel",
    "quantize_blocks_triton",
    "quantize_per_block",
    "quantized_attention",
    "quantized_reference",
    "smooth_k",
    "kernel_view",
]

#: Storage dtype of each ``QK_MODE``'s quantized values, as the kernels load them.
_STORAGE = {1: torch.int8, 2: torch.float8_e4m3fn}


def _quantized_mode(fmt: str) -> int:
    """``QK_MODE`` of a quantized format (not ``"native"``); ValueError otherwise."""
    mode = qk_mode(fmt)
    if mode == 0:
        raise ValueError(f"Expected a quantized format in {KERNEL_QK_FORMATS} (or 'fp8'), but got {fmt!r}.")
    return mode


def quantize_per_block(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``(B, H, N, D)`` in blocks of ``block`` rows: returns ``(x_q, scale (B, H, cdiv(N, block)))``.

    The family's :func:`~attnopt.replacements.quantized.quantize_blocks`, with ``x_q`` in the
    dtype the kernels read (int8, or float8 e4m3 for ``"fp8"``/``"fp8_e4m3"``): ``x ≈ x_q * scale``.
    """
    mode = _quantized_mode(fmt)
    values, scales = quantize_blocks(x, block, fmt)
    return values.to(_STORAGE[mode]).contiguous(), scales.contiguous()


def prepare_quantized_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    qk_format: str,
    block_m: int,
    block_n: int,
    *,
    smooth: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel inputs for Q·Kᵀ: ``(q_in, k_in, q_scales, k_scales)``.

    ``"native"`` passes q and k through (the scale tensors are unused placeholders); ``"int8"``
    and ``"fp8"`` (or ``"fp8_e4m3"``) quantize ``q * scale`` and K, smoothed unless
    ``smooth=False``, per block. Passing the softmax scale as ``scale`` is the family's rule (the
    scale is folded into Q before quantising), after which the kernel multiplies the dequantised
    scores by nothing else; the default 1 quantizes Q as given. FP8 needs sm89+ (or the interpreter).
    """
    if qk_format == "native":
        dummy = torch.ones(1, 1, 1, dtype=torch.float32, device=q.device)
        return q, k, dummy, dummy
    qk_mode(qk_format)  # rejects formats without a kernel
    if qk_format_name(qk_format) == "fp8_e4m3" and not fp8_supported(q.device):
        raise ValueError(
            f"Expected a device with FP8 dots (CUDA sm89+), but got {q.device}. Use qk_format='int8' there."
        )
    q_q, q_s = quantize_blocks_triton(q, block_m, qk_format, factor=scale)
    k_q, k_s = quantize_blocks_triton(k, block_n, qk_format, mean=key_mean(k) if smooth else None)
    return q_q, k_q, q_s, k_s


@triton.jit
def _round_half_even(y):
    """Round to the nearest integer, ties to even (``torch.round``'s rule)."""
    r = tl.floor(y + 0.5)
    return tl.where(((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)


@triton.jit
def _round_to_e4m3(y):
    """The nearest e4m3 value (ties to even) as float32, computed exactly from the exponent bits.

    Rounding explicitly makes the final fp8 cast exact, so the result is the same on every GPU
    and under the interpreter (whose fp32→fp8 cast drops the carry into the next binade).
    """
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # spacing of e4m3 values near y: 3 mantissa bits, fixed below 2^-6 (subnormals)
    step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(y / step) * step


@triton.jit
def _quantize_blocks_fwd(
    X, MEAN, XQ, SCALE,
    factor,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_mb, stride_mh, stride_md,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_sb, stride_sh, stride_sn,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    SMOOTH: tl.constexpr, QK_MODE: tl.constexpr, QMAX: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(N, BLOCK), B * H)``: one block's absmax scale and its int8 / e4m3 values, one pass.

    Computes the family's ``quantize_blocks`` of ``x * factor − mean``: the same float32 products,
    differences and divisions, the same zero-block scale (1, ``block_scales``), ``QMAX`` from the
    family's ``QK_FORMATS``.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    x_ptrs = X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32) * factor
    if SMOOTH:
        mean = tl.load(
            MEAN + b * stride_mb + h * stride_mh + offs_d * stride_md, mask=offs_d < HEAD_DIM, other=0.0
        )
        x = tl.where(ok, x - mean[None, :], 0.0)
    scale = tl.max(tl.max(tl.abs(x), 1), 0) / QMAX
    scale = tl.where(scale > 0, scale, 1.0)  # all-zero blocks: scale 1 (the family's block_scales)
    y = x / scale
    q_ptrs = XQ + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd
    if QK_MODE == 1:
        r = _round_half_even(y)
        tl.store(q_ptrs, tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8), mask=ok)
    else:
        r = _round_to_e4m3(tl.minimum(tl.maximum(y, -QMAX), QMAX))
        tl.store(q_ptrs, r.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=ok)
    tl.store(SCALE + b * stride_sb + h * stride_sh + pid_n * stride_sn, scale)


def quantize_blocks_triton(
    x: torch.Tensor, block: int, fmt: str, *, mean: torch.Tensor | None = None, factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_per_block` of ``x * factor − mean`` in one fused pass (one read of x, one int8 write).

    ``mean`` is ``(B, H, D)`` float32 (the K smoothing, ``key_mean``) or None; ``factor`` is the
    softmax scale for Q (the family folds it into Q before quantising) and 1 for K. Same values as
    the PyTorch version up to float32 division rounding (GPUs divide approximately), which can
    move a value sitting on a rounding boundary by one step.
    """
    mode = _quantized_mode(fmt)
    b, h, n, d = x.shape
    nb = cdiv(n, block)
    xq = torch.empty(x.shape, dtype=_STORAGE[mode], device=x.device)
    scale = torch.empty(b, h, nb, dtype=torch.float32, device=x.device)
    m = mean if mean is not None else scale
    m_strides = mean.stride() if mean is not None else (0, 0, 0)
    xq_bits = kernel_view(xq)
    _quantize_blocks_fwd[(nb, b * h)](
        x, m, xq_bits, scale, float(factor),
        *x.stride(), *m_strides, *xq_bits.stride(), *scale.stride(),
        h, n,
        HEAD_DIM=d, BLOCK=block, BLOCK_D=triton.next_power_of_2(d),
        SMOOTH=mean is not None, QK_MODE=mode, QMAX=FAMILY_QK_FORMATS[qk_format_name(fmt)],
    )  # fmt: skip
    return xq, scale


def kernel_view(x: torch.Tensor) -> torch.Tensor:
    """FP8 tensors go to the kernels as their uint8 bits (see ``_common.load_q``)."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def quantized_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qk_format: str = "int8",
    block_m: int = 64,
    block_n: int = 64,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The family's :func:`~attnopt.replacements.quantized.quantized_reference` in this module's terms.

    Q/K quantized as the kernels do (``qk_format`` "int8" or "fp8", blocks ``block_m`` x
    ``block_n``, K smoothed) and P·V left unquantised (``pv_format="fp32"``): the float32 statement
    the kernels are held to; their P in V's dtype adds the fp16 rounding the tests allow for.
    ``scale`` defaults to ``D ** -0.5``. Returns ``(B, Hq, Nq, Dv)`` float32.
    """
    _quantized_mode(qk_format)
    config = QuantizedConfig(
        qk_format=qk_format_name(qk_format), pv_format="fp32", q_block=block_m, k_block=block_n, smooth_k=True
    )
    return family_quantized_reference(
        q,
        k,
        v,
        config,
        scale=default_scale(scale, q.shape[-1]),
        causal=causal,
        window=window,
        attn_mask=attn_mask,
    )


_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (8, 3), (4, 4), (8, 2))]
)


@triton.autotune(
    configs=_CONFIGS, key=["Nq", "Nk", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "QK_MODE", "CAUSAL", "WINDOW"]
)
@triton.jit
def _dense_attn_fwd(
    Q, K, V, Out, QS, KS,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_qsb, stride_qsh, stride_qsm,
    stride_ksb, stride_ksh, stride_ksn,
    Hq, Nq, Nk,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, QK_MODE: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Nq, BLOCK_M), B * Hq)``; masked edge tiles, unmasked interior (tutorial stages)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // Hq
    h = off_bh % Hq
    hkv = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_pos = offs_m + (Nk - Nq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_q(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, Nq, HEAD_DIM, QK_MODE)
    q_scale = 1.0
    if QK_MODE != 0:
        q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + start_m * stride_qsm)
    K_bh = K + b * stride_kb + hkv * stride_kh
    V_bh = V + b * stride_vb + hkv * stride_vh
    KS_bh = KS + b * stride_ksb + hkv * stride_ksh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = dense_tile_bounds(start_m, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, full_lo, BLOCK_N):  # left window edge
        acc, l_i, m_i = attn_tile(
            acc, l_i, m_i, q, q_scale, K_bh, V_bh, KS_bh, stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
            start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale, WINDOW,
            BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, True, CAUSAL, WINDOW > 0, 0, QK_MODE,
        )  # fmt: skip
    for start_n in range(full_lo, full_hi, BLOCK_N):  # interior: no mask at all
        acc, l_i, m_i = attn_tile(
            acc, l_i, m_i, q, q_scale, K_bh, V_bh, KS_bh, stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
            start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale, WINDOW,
            BLOCK_N, HEAD_DIM, HEAD_DIM_V, False, False, CAUSAL, WINDOW > 0, 0, QK_MODE,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):  # diagonal and the ragged end
        acc, l_i, m_i = attn_tile(
            acc, l_i, m_i, q, q_scale, K_bh, V_bh, KS_bh, stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
            start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale, WINDOW,
            BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, True, CAUSAL, WINDOW > 0, 0, QK_MODE,
        )  # fmt: skip
    out = finish_rows(acc, l_i)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(
        o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V)
    )


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
    qk_format: str = "int8",
    block_m: int = 64,
    block_n: int = 64,
    smooth: bool = True,
    pv_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention with quantized Q·Kᵀ (module docstring); ``qk_format="native"`` is plain flash.

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)``; fp16/bf16/fp32.
        scale: softmax scale (``D ** -0.5`` when None).
        causal, window: bottom-right causal constraint and sliding window (keys incl. the diagonal).
        qk_format: ``"int8"``, ``"fp8"`` (sm89+) or ``"native"``.
        block_m, block_n: quantization blocks = kernel tiles (fixed, so numerics never depend on tuning).
        smooth: subtract K's mean before quantizing (exact under softmax; off only to compare).
        pv_dtype: the dtype P̃ and V take in the P·V dot (the family's ``pv_format``); default v's.
            Q and K are quantized from their own dtype and the output keeps v's, so an fp32 or
            bf16 model loses nothing outside the P·V rounding its plan measured.
        out: optional preallocated output ``(B, Hq, Nq, Dv)`` in v's dtype.

    Returns:
        ``(B, Hq, Nq, Dv)`` in v's dtype. Example: for fp16 random inputs the relative error
        against exact attention is about 1e-2 (int8), like SageAttention 1.0.6.
    """
    dims = validate_qkv(q, k, v, where="quantized_attention")
    for name, tile in (("block_m", block_m), ("block_n", block_n)):
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"quantized_attention: expected {name} a power of two >= 16, but got {tile}.")
    if window is not None and window < 1:
        raise ValueError(f"quantized_attention: expected window >= 1 or None, but got {window}.")
    scale = default_scale(scale, dims.head_dim)
    out = make_out(q, v, out, dims, where="quantized_attention")
    if pv_dtype is not None and pv_dtype != v.dtype:
        v = v.to(pv_dtype)
        if qk_format == "native":  # one dtype through both dots, as plain flash
            q, k = q.to(pv_dtype), k.to(pv_dtype)
    q_in, k_in, qs, ks = prepare_quantized_qk(q, k, qk_format, block_m, block_n, smooth=smooth, scale=scale)
    q_in, k_in = kernel_view(q_in), kernel_view(k_in)
    qk_mode_ = qk_mode(qk_format)
    qk_scale = (scale if qk_mode_ == 0 else 1.0) * LOG2E  # quantized Q already holds the softmax scale
    constexprs = dict(
        GROUP=dims.group, HEAD_DIM=dims.head_dim, HEAD_DIM_V=dims.head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(dims.head_dim, quantized=qk_format != "native"),
        BLOCK_DV=head_block(dims.head_dim_v),
        CAUSAL=bool(causal), WINDOW=int(window or 0), QK_MODE=qk_mode_,
    )  # fmt: skip
    source.record_launch(_dense_attn_fwd, constexprs)
    grid = (cdiv(dims.q_len, block_m), dims.batch * dims.heads)
    _dense_attn_fwd[grid](
        q_in, k_in, v, out, qs, ks, qk_scale,
        *q_in.stride(), *k_in.stride(), *v.stride(), *out.stride(), *qs.stride(), *ks.stride(),
        dims.heads, dims.q_len, dims.kv_len,
        **constexprs,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------
# attnopt::quantized on CUDA
# ------------------------------------------------------------------------------------------

#: ``QuantizedConfig.pv_format`` -> dtype of V (and P) in the P·V product.
_PV_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _unsupported(cfg, call: AttentionCall) -> str | None:  # noqa: ANN001
    """Why the Triton kernel cannot serve this call, or None."""
    if call.attn_mask is not None:
        return "a model mask tensor"
    if cfg.qk_format not in KERNEL_QK_FORMATS:
        return f"qk_format={cfg.qk_format!r} has no kernel"
    if cfg.pv_format not in _PV_DTYPES:
        return f"pv_format={cfg.pv_format!r} has no kernel"
    if cfg.qk_format == "fp8_e4m3" and not fp8_supported(call.q.device):
        return "FP8 Q·Kᵀ needs sm89+"
    for name in ("q_block", "k_block"):
        value = getattr(cfg, name)
        if value < 16 or value > 128 or value & (value - 1):
            return f"{name}={value} is not a power of two in [16, 128]"
    return None


@register_kernel("quantized", "cuda")
def quantized_kernel(call: AttentionCall) -> torch.Tensor:
    """``attnopt::quantized`` on CUDA with :class:`attnopt.replacements.quantized.QuantizedConfig` semantics.

    The config's ``q_block``/``k_block`` are the kernel tiles; ``pv_format="fp16"`` runs P·V in
    fp16 (V cast when the model is bf16/fp32). Uncovered calls go to the portable kernel.
    """
    cfg = call.family_config(QuantizedConfig)
    reason = _unsupported(cfg, call)
    if reason is not None:
        return portable_fallback("quantized", call, reason)
    return quantized_attention(
        call.q, call.k, call.v, scale=call.scale, causal=call.causal, window=call.window, qk_format=cfg.qk_format,
        block_m=cfg.q_block, block_n=cfg.k_block, smooth=cfg.smooth_k, pv_dtype=_PV_DTYPES[cfg.pv_format],
    )  # fmt: skip
