"""The AOT compile matrix: which launches of which kernel :mod:`.aot` compiles for sm_80/90/100.

A case names one entry kernel of this package and a call of the host wrapper that launches it,
on ``meta`` tensors of a realistic shape; the signature and constexprs compiled are whatever that
wrapper passes (see :func:`attnopt.codegen.triton.aot.capture_launch`), so they cannot drift from
the launch sites. Together the cases cover every constexpr branch the wrappers and the
``attnopt::*`` CUDA adapters use: each ``QK_MODE`` (native, int8, fp8 e4m3), causal and not,
sliding windows (scalar and per head), sinks, full-block lists, ragged key lengths, member counts,
the hybrid linear window, and the fp16 / bf16 / fp32 inputs the wrappers accept.

Shapes: ``LLAMA`` (B=1, 32 query heads over 8 kv heads, 4096 tokens, D=128, what
``benchmarks/kernels.py`` times) and ``BERT`` (B=8, 12 heads, 512 tokens, D=64). Block sizes are
the defaults of the wrappers and configs (``QuantizedConfig`` runs 128x64 tiles; the block-sparse
static layouts use 64-key blocks).

``representative`` marks the subset the test suite compiles for sm_80 and sm_100 (sm_90 gets
every case; ``benchmarks/triton_aot.py`` compiles everything for all three). FP8 cases skip
sm_80: the wrappers refuse fp8 below sm89 (``_common.fp8_supported``), as does Triton
(``fp8e4nv`` is in ``supported_fp8_dtypes`` only from sm89).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnopt.codegen.triton import block_sparse, linear, quantized, shared

__all__ = [
    "BRANCHES",
    "CASES",
    "FP8_MIN_CC",
    "FP8_SKIP_REASON",
    "TARGETS",
    "AotCase",
    "Shape",
    "branch_value",
]

#: Compute capabilities every kernel must compile for (Ampere, Hopper, Blackwell datacentre).
TARGETS: tuple[int, ...] = (80, 90, 100)

#: Lowest compute capability with FP8 e4m3 dots (what ``_common.fp8_supported`` checks on CUDA).
FP8_MIN_CC = 89
FP8_SKIP_REASON = (
    "fp8 e4m3 needs sm89+: the wrappers refuse it below (8, 9) (_common.fp8_supported) and "
    "Triton 3.7 rejects fp8e4nv there ('type fp8e4nv not supported in this architecture')"
)

META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of one attention call."""

    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int

    def qkv(self, dtype: torch.dtype, *, kv_seq: int | None = None) -> tuple[torch.Tensor, ...]:
        """``q, k, v`` on the meta device, contiguous ``(B, H, N, D)`` as models hand them over."""
        nk = kv_seq or self.seq
        q = torch.empty(self.batch, self.heads, self.seq, self.head_dim, dtype=dtype, device=META)
        k = torch.empty(self.batch, self.kv_heads, nk, self.head_dim, dtype=dtype, device=META)
        return q, k, torch.empty_like(k)


LLAMA = Shape(batch=1, heads=32, kv_heads=8, seq=4096, head_dim=128)
BERT = Shape(batch=8, heads=12, kv_heads=12, seq=512, head_dim=64)


@dataclasses.dataclass(frozen=True)
class AotCase:
    """One compile case: ``launch()`` calls the wrapper that launches ``kernel`` (``"<module>.<name>"``).

    ``fp8`` cases are skipped below :data:`FP8_MIN_CC`; ``xfail`` maps a target to the exact
    compiler error a case is known to hit there (none today).
    """

    name: str
    kernel: str
    launch: Callable[[], Any]
    representative: bool = False
    fp8: bool = False
    xfail: Mapping[int, str] = dataclasses.field(default_factory=dict)

    @property
    def skip(self) -> dict[int, str]:
        """Targets this case is not compiled for, with the reason."""
        return {cc: FP8_SKIP_REASON for cc in TARGETS if self.fp8 and cc < FP8_MIN_CC}

    def patches(self) -> dict[tuple[Any, str], Any]:
        """Temporary replacements while the launch is captured: ``meta`` tensors cannot say they are sm89+."""
        return {(quantized, "fp8_supported"): lambda device: True} if self.fp8 else {}


# ------------------------------------------------------------------------------------------
# Launchers (host wrappers on meta tensors)
# ------------------------------------------------------------------------------------------


def _dense(
    shape: Shape, dtype: torch.dtype, qk_format: str, *, block_m: int = 64, block_n: int = 64, **kw: Any
) -> None:
    quantized.quantized_attention(
        *shape.qkv(dtype), qk_format=qk_format, block_m=block_m, block_n=block_n, **kw
    )


def _quantize(shape: Shape, dtype: torch.dtype, fmt: str, *, keys: bool, block: int) -> None:
    """The two launches of ``prepare_quantized_qk``: Q scaled by the softmax scale, or K smoothed."""
    q, k, _ = shape.qkv(dtype)
    if keys:
        quantized.quantize_blocks_triton(k, block, fmt, mean=quantized.key_mean(k))
    else:
        quantized.quantize_blocks_triton(q, block, fmt, factor=shape.head_dim**-0.5)


def _block_sparse(
    shape: Shape,
    dtype: torch.dtype,
    *,
    causal: bool,
    window: int | list[int] | None = None,
    sink: int = 0,
    full: bool = True,
    kv_seq: int | None = None,
    qk_format: str = "native",
    block: int = 64,
) -> None:
    nk = kv_seq or shape.seq
    scalar = window if isinstance(window, int) or window is None else max(window)
    lay = block_sparse.structural_layout(
        shape.seq, nk, q_block=block, kv_block=block, causal=causal, window=scalar, sink=sink
    )
    num, idx, fnum, fidx = (t.to(META) for t in lay)
    if not full:  # every visited block through the masked path (dynamic / skip layouts have no full list)
        num, idx = fnum, fidx
    block_sparse.block_sparse_attention(
        *shape.qkv(dtype, kv_seq=nk),
        num,
        idx,
        fnum if full else None,
        fidx if full else None,
        q_block=block,
        kv_block=block,
        causal=causal,
        window=window,
        sink=sink,
        qk_format=qk_format,
    )


def _linear(shape: Shape, dtype: torch.dtype, *, causal: bool, window: int = 0, features: int = 64) -> None:
    """``linear_kernel``'s call: Hedgehog features (2 x LinearConfig.feature_dim) in V's dtype, chunk 64."""
    q, k, v = shape.qkv(dtype)
    phi_q = torch.empty(*q.shape[:3], features, dtype=dtype, device=META)
    phi_k = torch.empty(*k.shape[:3], features, dtype=dtype, device=META)
    linear.linear_attention(phi_q, phi_k, v, causal=causal, window=window or None, q=q, k=k, chunk=64)


def _shared(
    shape: Shape, dtype: torch.dtype, cluster_size: int, *, causal: bool, window: int | None = None
) -> None:
    """``shared_kernel``'s call: clusters of ``cluster_size`` consecutive heads, members picked by default."""
    cluster_of_head = torch.arange(shape.heads) // cluster_size
    representatives = torch.arange(0, shape.heads, cluster_size)
    shared.shared_attention(*shape.qkv(dtype), cluster_of_head, representatives, causal=causal, window=window)


def _case(
    name: str,
    kernel: str,
    fn: Callable[..., None],
    *args: Any,
    rep: bool = False,
    fp8: bool = False,
    **kw: Any,
) -> AotCase:
    return AotCase(name, kernel, functools.partial(fn, *args, **kw), representative=rep, fp8=fp8)


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
_DENSE = "quantized._dense_attn_fwd"
_QUANT = "quantized._quantize_blocks_fwd"
_SPARSE = "block_sparse._block_sparse_fwd"
_LINEAR = "linear._linear_fwd"
_SHARED = "shared._shared_fwd"

# fmt: off
#: Every compile case; names are ``<kernel>/<format>-<dtype>-<shape>[-<flags>]``.
CASES: tuple[AotCase, ...] = (
    # dense flash with native / int8 / fp8 Q·Kᵀ (QuantizedConfig tiles 128x64 for the quantized ones)
    _case("dense/native-fp16-llama", _DENSE, _dense, LLAMA, F16, "native"),
    _case("dense/native-fp16-llama-causal", _DENSE, _dense, LLAMA, F16, "native", causal=True, rep=True),
    _case("dense/native-fp16-llama-window", _DENSE, _dense, LLAMA, F16, "native", causal=True, window=1024),
    _case("dense/native-bf16-llama-causal", _DENSE, _dense, LLAMA, BF16, "native", causal=True, rep=True),
    _case("dense/native-fp32-bert", _DENSE, _dense, BERT, F32, "native"),
    _case("dense/native-fp16-bert", _DENSE, _dense, BERT, F16, "native"),
    _case("dense/int8-fp16-llama", _DENSE, _dense, LLAMA, F16, "int8", block_m=128),
    _case("dense/int8-fp16-llama-causal", _DENSE, _dense, LLAMA, F16, "int8", block_m=128, causal=True, rep=True),
    _case("dense/int8-fp16-llama-window", _DENSE, _dense, LLAMA, F16, "int8", block_m=128, causal=True,
          window=1024),
    _case("dense/int8-bf16-llama-causal", _DENSE, _dense, LLAMA, BF16, "int8", block_m=128, causal=True),
    _case("dense/int8-fp32-bert", _DENSE, _dense, BERT, F32, "int8", block_m=128),
    _case("dense/fp8-fp16-llama", _DENSE, _dense, LLAMA, F16, "fp8", block_m=128, fp8=True),
    _case("dense/fp8-fp16-llama-causal", _DENSE, _dense, LLAMA, F16, "fp8", block_m=128, causal=True,
          rep=True, fp8=True),
    # the fused quantiser: Q (softmax scale folded in) and smoothed K, int8 and e4m3
    _case("quantize/int8-fp16-llama-q", _QUANT, _quantize, LLAMA, F16, "int8", keys=False, block=128),
    _case("quantize/int8-fp16-llama-k", _QUANT, _quantize, LLAMA, F16, "int8", keys=True, block=64, rep=True),
    _case("quantize/int8-bf16-llama-k", _QUANT, _quantize, LLAMA, BF16, "int8", keys=True, block=64),
    _case("quantize/int8-fp32-bert-k", _QUANT, _quantize, BERT, F32, "int8", keys=True, block=64),
    _case("quantize/fp8-fp16-llama-q", _QUANT, _quantize, LLAMA, F16, "fp8", keys=False, block=128, fp8=True),
    _case("quantize/fp8-fp16-llama-k", _QUANT, _quantize, LLAMA, F16, "fp8", keys=True, block=64, rep=True,
          fp8=True),
    # block-sparse over FlexAttention-style lists, and its sparse+quantized variant
    _case("block_sparse/native-fp16-llama-causal", _SPARSE, _block_sparse, LLAMA, F16, causal=True),
    _case("block_sparse/native-fp16-llama-sink-window", _SPARSE, _block_sparse, LLAMA, F16, causal=True,
          window=1024, sink=4),
    _case("block_sparse/native-fp16-llama-head-windows", _SPARSE, _block_sparse, LLAMA, F16, causal=True,
          window=[256, 512, 1024, 2048] * 8, sink=4, rep=True),
    _case("block_sparse/native-fp16-bert-partial-only", _SPARSE, _block_sparse, BERT, F16, causal=False,
          full=False),
    _case("block_sparse/native-fp16-llama-ragged", _SPARSE, _block_sparse, LLAMA, F16, causal=True,
          kv_seq=4000),
    _case("block_sparse/native-bf16-llama-causal", _SPARSE, _block_sparse, LLAMA, BF16, causal=True),
    _case("block_sparse/native-fp32-bert-causal", _SPARSE, _block_sparse, BERT, F32, causal=True),
    _case("block_sparse/int8-fp16-llama-causal", _SPARSE, _block_sparse, LLAMA, F16, causal=True,
          qk_format="int8", rep=True),
    _case("block_sparse/fp8-fp16-llama-sink-window", _SPARSE, _block_sparse, LLAMA, F16, causal=True,
          window=1024, sink=4, qk_format="fp8", fp8=True),
    # chunked linear attention (F = 2 x 32 Hedgehog features) and the hybrid window
    _case("linear/fp16-llama", _LINEAR, _linear, LLAMA, F16, causal=False),
    _case("linear/fp16-llama-causal", _LINEAR, _linear, LLAMA, F16, causal=True),
    _case("linear/fp16-llama-hybrid", _LINEAR, _linear, LLAMA, F16, causal=True, window=64, rep=True),
    _case("linear/bf16-llama-causal", _LINEAR, _linear, LLAMA, BF16, causal=True),
    _case("linear/fp32-bert-causal", _LINEAR, _linear, BERT, F32, causal=True),
    # shared scores: members per program 4 / 2 / 1
    _case("shared/fp16-llama-m4", _SHARED, _shared, LLAMA, F16, 4, causal=False),
    _case("shared/fp16-llama-m4-causal", _SHARED, _shared, LLAMA, F16, 4, causal=True, rep=True),
    _case("shared/fp16-llama-m2-window", _SHARED, _shared, LLAMA, F16, 2, causal=True, window=1024),
    _case("shared/bf16-llama-m4-causal", _SHARED, _shared, LLAMA, BF16, 4, causal=True),
    _case("shared/fp32-bert-m1-causal", _SHARED, _shared, BERT, F32, 1, causal=True),
)

#: The constexpr branches the wrappers reach, per kernel: the cases must cover each value (the test
#: checks). ``WINDOW`` and ``SINK`` count as off / on (``> 0``), see :func:`branch_value`.
BRANCHES: dict[str, dict[str, set]] = {
    _DENSE: {"QK_MODE": {0, 1, 2}, "CAUSAL": {False, True}, "WINDOW": {False, True}},
    _QUANT: {"QK_MODE": {1, 2}, "SMOOTH": {False, True}},
    _SPARSE: {
        "QK_MODE": {0, 1, 2}, "CAUSAL": {False, True}, "WINDOW": {False, True}, "HEAD_WINDOWS": {False, True},
        "SINK": {False, True}, "HAS_FULL": {False, True}, "EVEN_N": {False, True},
    },
    _LINEAR: {"CAUSAL": {False, True}, "WINDOW": {False, True}},
    _SHARED: {"CAUSAL": {False, True}, "WINDOW": {False, True}, "MEMBERS": {1, 2, 4}},
}
# fmt: on


def branch_value(flag: str, value: Any) -> Any:
    """How :data:`BRANCHES` counts a constexpr: sizes that only switch a branch on become bools."""
    return value > 0 if flag in ("WINDOW", "SINK") else value
