"""Pieces every attnopt Triton kernel shares: the flash inner step, masks, tile ranges, host checks.

The kernels of this package follow the structure of Triton's fused-attention tutorial: one
inner-loop ``@triton.jit`` helper (:func:`attn_tile`: one key tile of online softmax) and thin
outer kernels that decide *which* key tiles a query block visits (a dense causal/window range,
or a FlexAttention-style list of blocks). Keeping the inner step in one place means the sparse,
quantized and sparse+quantized kernels cannot drift apart numerically.

Conventions (identical to :func:`attnopt.replacements.exact.attention_reference`):

* ``q`` is ``(B, Hq, Nq, D)``, ``k`` ``(B, Hkv, Nk, D)``, ``v`` ``(B, Hkv, Nk, Dv)``; query head
  ``h`` reads key/value head ``h // (Hq // Hkv)`` (GQA without repeating K/V in memory).
* Causal is bottom-right aligned: query row ``i`` sits at key position ``i + Nk - Nq`` and sees
  keys ``j <= i + Nk - Nq``. A window ``W`` keeps the ``W`` keys ending at the diagonal; a sink
  ``S`` additionally keeps keys ``j < S`` (attention sinks).
* Rows that see no key produce zeros, never NaN.

Nothing here touches CUDA at import time: importing works on a CPU-only machine, and with
``TRITON_INTERPRET=1`` every kernel runs on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attnopt.replacements.quantized import QK_FORMAT_ALIASES

__all__ = [
    "KERNEL_QK_FORMATS",
    "LOG2E",
    "QK_FORMATS",
    "Dims",
    "attn_tile",
    "autotune_configs",
    "cdiv",
    "default_scale",
    "dense_tile_bounds",
    "finish_rows",
    "fp8_supported",
    "head_block",
    "is_interpreting",
    "load_q",
    "make_out",
    "portable_fallback",
    "qk_mode",
    "rel_error",
    "structural_allowed",
    "validate_qkv",
]

#: ``log2(e)``: kernels use ``exp2`` and fold this factor into the softmax scale.
LOG2E = 1.4426950408889634

#: The quantized family's Q/K formats that have a kernel, in ``QK_MODE`` order from 1 (the
#: branches of :func:`attn_tile` and the fused quantiser): 1 = int8 (round to nearest, int32
#: dot), 2 = fp8 e4m3 (sm89+). Names, ranges and rounding come from
#: :mod:`attnopt.replacements.quantized`, the formats' one definition.
KERNEL_QK_FORMATS: tuple[str, ...] = ("int8", "fp8_e4m3")

_SHORT_NAMES = {name: alias for alias, name in QK_FORMAT_ALIASES.items()}

#: How Q·Kᵀ is computed, as the kernels' ``qk_format`` arguments spell it: in the inputs' dtype
#: (``"native"``), then :data:`KERNEL_QK_FORMATS` under their short aliases (``"fp8"`` for
#: ``"fp8_e4m3"``). The index is the kernels' ``QK_MODE`` constexpr (:func:`qk_mode`); the family
#: names are accepted too.
QK_FORMATS: tuple[str, ...] = ("native", *(_SHORT_NAMES.get(name, name) for name in KERNEL_QK_FORMATS))


def qk_mode(qk_format: str, *, where: str = "") -> int:
    """The ``QK_MODE`` constexpr of ``qk_format``: 0 for ``"native"``, else 1 + its :data:`KERNEL_QK_FORMATS` index.

    Accepts the spellings of :data:`QK_FORMATS` and the family's names (``"fp8_e4m3"``).

    Raises:
        ValueError: for any other format (``int16`` has no kernel), prefixed with ``where``.
    """
    if qk_format == "native":
        return 0
    name = QK_FORMAT_ALIASES.get(qk_format, qk_format)
    if name not in KERNEL_QK_FORMATS:
        expected = f"{where}: expected" if where else "Expected"
        raise ValueError(f"{expected} qk_format in {QK_FORMATS}, but got {qk_format!r}.")
    return 1 + KERNEL_QK_FORMATS.index(name)


def is_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The autotune search space, cut to its first config under the interpreter.

    The interpreter crashes on ``@triton.autotune`` with more than one config, and timing there
    means nothing anyway; the first config is therefore the one the tests exercise.
    """
    return configs[:1] if is_interpreting() else configs


def fp8_supported(device: torch.device) -> bool:
    """FP8 e4m3 dots need sm89+ on CUDA; the interpreter emulates them on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and is_interpreting()


def head_block(dim: int, *, quantized: bool = False) -> int:
    """Padded tile width for a head dimension: a power of two, at least 16 (``tl.dot``'s minimum),
    at least 32 for 8-bit operands (the int8/fp8 MMA reduction depth)."""
    return max(32 if quantized else 16, triton.next_power_of_2(dim))


@dataclass(frozen=True)
class Dims:
    """Sizes of one attention call, checked once at the host boundary."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    head_dim_v: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def validate_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, where: str) -> Dims:
    """Check shapes, dtypes and devices of ``q, k, v``; return their sizes.

    Raises:
        TypeError: when the tensors are not floating point of one dtype.
        ValueError: on wrong ranks, mismatched sizes, indivisible GQA groups or mixed devices.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: expected {name} to be a torch.Tensor, but got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{where}: expected {name} of shape (B, H, N, D), but got shape {tuple(t.shape)}. "
                "Permute to (batch, heads, seq, head_dim) first."
            )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"{where}: expected q, k, v of one dtype among float16/bfloat16/float32, but got "
            f"{q.dtype}, {k.dtype}, {v.dtype}. Cast them to one dtype."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{where}: expected q, k, v on one device, but got {q.device}, {k.device}, {v.device}."
        )
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if bk != b or v.shape[0] != b or v.shape[1] != hkv or v.shape[2] != nk or dk != d:
        raise ValueError(
            f"{where}: expected k (B, Hkv, Nk, D) and v (B, Hkv, Nk, Dv) matching q (B, Hq, Nq, D), but got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}."
        )
    if hq % hkv:
        raise ValueError(
            f"{where}: expected query heads divisible by key/value heads, but got Hq={hq}, Hkv={hkv}."
        )
    if nq == 0 or nk == 0:
        raise ValueError(f"{where}: expected non-empty sequences, but got Nq={nq}, Nk={nk}.")
    return Dims(b, hq, hkv, nq, nk, d, v.shape[-1])


def make_out(
    q: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None, dims: Dims, *, where: str
) -> torch.Tensor:
    """The output buffer ``(B, Hq, Nq, Dv)`` in ``v``'s dtype: ``out`` after checking it, else a new one."""
    shape = (dims.batch, dims.heads, dims.q_len, dims.head_dim_v)
    if out is None:
        return torch.empty(shape, dtype=v.dtype, device=q.device)
    if tuple(out.shape) != shape or out.dtype != v.dtype or out.device != q.device:
        raise ValueError(
            f"{where}: expected out of shape {shape}, dtype {v.dtype} on {q.device}, but got "
            f"{tuple(out.shape)}, {out.dtype} on {out.device}. Pass out=None to allocate one."
        )
    return out


def default_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale, ``head_dim ** -0.5`` when not given."""
    return head_dim**-0.5 if scale is None else float(scale)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host-side sizes."""
    return -(-a // b)


# ------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------


@triton.jit
def structural_allowed(
    offs_pos, offs_n, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SINK: tl.constexpr
):
    """The causal / window / sink rule for a (BLOCK_M, BLOCK_N) tile; ``offs_pos`` are query positions.

    A window implies causality (``window`` counts keys up to the diagonal); the sink keeps the
    first ``SINK`` keys visible to every query on top of the window. ``window`` is a run-time
    value so that one compiled kernel serves per-head windows.
    """
    allowed = offs_n[None, :] >= 0
    if CAUSAL or HAS_WINDOW:
        allowed = allowed & (offs_n[None, :] <= offs_pos[:, None])
    if HAS_WINDOW:
        in_window = offs_n[None, :] > offs_pos[:, None] - window
        if SINK > 0:
            in_window = in_window | (offs_n[None, :] < SINK)
        allowed = allowed & in_window
    return allowed


@triton.jit
def attn_tile(
    acc,
    l_i,
    m_i,
    q,
    q_scale,
    K_bh,
    V_bh,
    KS_bh,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_ksn,
    start_n,
    offs_pos,
    offs_d,
    offs_dv,
    Nk,
    qk_scale,
    window,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    STRUCT_MASK: tl.constexpr,
    BOUNDS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SINK: tl.constexpr,
    QK_MODE: tl.constexpr,
):
    """One key tile ``[start_n, start_n + BLOCK_N)`` of online softmax for one query block.

    ``acc`` (BLOCK_M, BLOCK_DV) fp32, ``l_i``/``m_i`` (BLOCK_M,) fp32 are in base-2 units
    (``qk_scale`` already holds ``scale * log2(e)``; just ``log2(e)`` for quantized Q, which the
    quantiser multiplied by the softmax scale as the quantized family defines). ``m_i`` starts at
    ``-inf``; a row whose
    every score so far is masked keeps ``m_i = -inf`` and contributes nothing, so fully masked
    rows never produce NaN. ``QK_MODE`` 0 multiplies in the inputs' dtype; 1 (int8) and 2 (fp8)
    multiply quantized tiles and rescale by the Q block's and this K block's scales (K blocks
    are ``BLOCK_N`` keys, so the scale index is ``start_n // BLOCK_N``). P·V runs in V's dtype.
    ``window`` is used only when ``HAS_WINDOW``; ``STRUCT_MASK`` applies the causal/window/sink
    rule, ``BOUNDS_MASK`` hides keys ``>= Nk`` (a ragged last tile).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_ok = offs_d[:, None] < HEAD_DIM
    if BOUNDS_MASK:
        k_t = tl.load(
            K_bh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok & (offs_n[None, :] < Nk),
            other=0,
        )
    else:
        k_t = tl.load(K_bh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=d_ok, other=0)
    if QK_MODE == 2:  # fp8 travels as uint8 bits (masked loads need a zero the interpreter can cast)
        k_t = k_t.to(tl.float8e4nv, bitcast=True)
    if QK_MODE == 0:
        qk = tl.dot(q, k_t) * qk_scale
    else:
        k_scale = tl.load(KS_bh + (start_n // BLOCK_N) * stride_ksn, mask=start_n < Nk, other=0.0)
        if QK_MODE == 1:
            qk = tl.dot(q, k_t, out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q, k_t, out_dtype=tl.float32)
        qk = qk * (q_scale * k_scale * qk_scale)
    if STRUCT_MASK or BOUNDS_MASK:
        allowed = offs_n[None, :] < Nk
        if STRUCT_MASK:
            allowed = allowed & structural_allowed(offs_pos, offs_n, window, CAUSAL, HAS_WINDOW, SINK)
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    if BOUNDS_MASK:
        v = tl.load(
            V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=dv_ok & (offs_n[:, None] < Nk),
            other=0.0,
        )
    else:
        v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=dv_ok, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def load_q(Q_bh, offs_m, offs_d, stride_qn, stride_qd, Nq, HEAD_DIM: tl.constexpr, QK_MODE: tl.constexpr):
    """The query tile, zero beyond ``Nq``/``HEAD_DIM``; fp8 (``QK_MODE`` 2) arrives as uint8 bits."""
    q = tl.load(Q_bh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0)  # fmt: skip
    if QK_MODE == 2:
        q = q.to(tl.float8e4nv, bitcast=True)
    return q


@triton.jit
def finish_rows(acc, l_i):
    """``acc / l`` with rows that saw no key (``l == 0``) left at zero."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None]


@triton.jit
def dense_tile_bounds(
    start_m, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr
):
    """Key tiles a dense query block visits, split as ``[lo, full_lo)`` masked, ``[full_lo, full_hi)``
    unmasked, ``[full_hi, hi)`` masked (the tutorial's stages, generalised to windows).

    Every bound except ``hi`` is a multiple of ``BLOCK_N``, so per-tile K scales stay aligned.
    Operands of ``//`` are clamped to be non-negative: the interpreter floors, GPUs truncate.
    """
    off = Nk - Nq
    row_lo = start_m * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, Nq) - 1
    pos_lo = row_lo + off
    pos_hi = row_hi + off
    if CAUSAL or WINDOW > 0:
        hi = tl.minimum(tl.maximum(pos_hi + 1, 0), Nk)
        full_hi = (tl.minimum(tl.maximum(pos_lo + 1, 0), Nk) // BLOCK_N) * BLOCK_N
    else:
        hi = Nk + 0 * start_m
        full_hi = (Nk // BLOCK_N) * BLOCK_N + 0 * start_m
    if WINDOW > 0:
        lo = (tl.minimum(tl.maximum(pos_lo - WINDOW + 1, 0), Nk) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.minimum(tl.maximum(pos_hi - WINDOW + 1, 0), Nk), BLOCK_N) * BLOCK_N
    else:
        lo = 0 * start_m
        full_lo = 0 * start_m
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (NaN propagates, so it never passes a tolerance)."""
    o, r = out.double(), ref.double()
    den = r.norm().item()
    return (o - r).norm().item() / (den if den > 0 else 1.0) if math.isfinite(den) else float("nan")


# ------------------------------------------------------------------------------------------
# Operator adapters: shared plumbing
# ------------------------------------------------------------------------------------------

_LOG = logging.getLogger("attnopt.codegen.triton")


def portable_fallback(family: str, call, reason: str) -> torch.Tensor:  # noqa: ANN001
    """Run the family's portable PyTorch kernel (registered for ``"cpu"``) on this call's tensors.

    Used for inputs the Triton kernels do not cover (model mask tensors, formats without a
    kernel); the result is the same function, only slower. Logged once per reason at INFO.
    """
    from attnopt.codegen.ops import KERNELS

    kernel = KERNELS.get((family, "cpu"))
    if kernel is None:
        raise NotImplementedError(
            f"attnopt::{family} on {call.q.device}: the Triton kernel does not cover this call ({reason}) and no "
            f"portable kernel is registered; import attnopt.codegen.cpu.{family} to provide one."
        )
    if reason not in _FALLBACK_REASONS:
        _FALLBACK_REASONS.add(reason)
        _LOG.info(
            "attnopt::%s (site %s): portable kernel used: %s", family, call.config.get("site", "?"), reason
        )
    return kernel(call)


_FALLBACK_REASONS: set[str] = set()
