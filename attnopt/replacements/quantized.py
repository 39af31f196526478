"""Quantized attention with SageAttention semantics: smoothed low-bit Q·Kᵀ, low-bit P·V.

What a ``quantized`` candidate computes, step by step (``quantized_reference`` spells it out):

1. **K smoothing** (``smooth_k``): subtract K's float32 mean over the sequence, per (batch, kv
   head, channel). Every score row ``i`` shifts by the constant ``q_i · mean(K)``, which softmax
   ignores, while the outlier channel means that ruin INT8 ranges disappear.
2. **Per-block symmetric quantisation** of ``Q * scale`` (the softmax scale is folded into Q)
   in blocks of ``q_block`` tokens and of K in blocks of ``k_block`` tokens, each block with one
   scale ``amax / qmax`` (INT8: round to nearest, clamp to ±127; FP8 e4m3: cast after scaling
   to ±448). All-zero blocks get scale 1 (:func:`block_scales`).
3. **Integer Q·Kᵀ** with exact accumulation, dequantised by the product of the two block scales.
4. The model's masks (structural causal/window and ``attn_mask``) after dequantisation, then
   softmax statistics in fp32: ``P̃ = exp(S - rowmax)`` in ``[0, 1]`` and ``l = Σ P̃``.
5. **P̃·V** with P̃ and V rounded to ``pv_format`` (fp16, or fp8 e4m3 with P̃ scaled by 448 and V
   per-channel scaled, as SageAttention2 does), fp32 accumulation, divided by ``l``.

This is the one definition: the Triton kernels (:mod:`attnopt.codegen.triton.quantized`, the
sparse+quantized mode of :mod:`attnopt.codegen.triton.block_sparse`) and the CPU emulation in
:mod:`attnopt.codegen.cpu.quantized` import these pieces and are tested against this reference.
FLOPs equal dense attention; only bytes and the per-format throughput differ, and the cost model
reads the format from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy
import torch

from attnopt.replacements.base import SYMBOLS, Candidate, CostFormula, Family, FamilyConfig, register_family
from attnopt.replacements.exact import combined_allowed, dense_cost, repeat_kv_heads

__all__ = [
    "PV_FORMATS",
    "QK_FORMATS",
    "QK_FORMAT_ALIASES",
    "QuantizedConfig",
    "QuantizedFamily",
    "block_scales",
    "key_mean",
    "qk_format_name",
    "quantize_blocks",
    "quantize_p",
    "quantize_v",
    "quantized_reference",
    "smooth_keys",
]

#: Q/K formats and the largest magnitude each represents: the one vocabulary of Q·Kᵀ formats
#: (configs and saved plans store these names; the Triton kernels derive their ``QK_MODE`` from
#: it). ``int16`` is for analysis (it checks that the emulation converges to exact attention);
#: kernels target int8 and fp8.
QK_FORMATS: dict[str, float] = {"int8": 127.0, "int16": 32767.0, "fp8_e4m3": 448.0}

#: Short spellings accepted where a function (not a config) names a format: the Triton kernels'
#: ``qk_format="fp8"`` predates this vocabulary and stays valid.
QK_FORMAT_ALIASES: dict[str, str] = {"fp8": "fp8_e4m3"}

#: P/V formats. ``fp32`` leaves P·V unquantised (analysis), ``fp16`` is SageAttention 1,
#: ``fp8_e4m3`` SageAttention 2 / Hopper.
PV_FORMATS: tuple[str, ...] = ("fp32", "fp16", "fp8_e4m3")

#: Bytes per element stored by each format.
_FORMAT_BYTES = {"int8": 1, "int16": 2, "fp8_e4m3": 1, "fp16": 2, "fp32": 4}

_FP8_MAX = 448.0


@dataclass(frozen=True)
class QuantizedConfig(FamilyConfig):
    """Settings of one quantized variant.

    Attributes:
        qk_format: format of Q and K in the score matmul, a key of :data:`QK_FORMATS`.
        pv_format: format of P̃ and V in the output matmul, one of :data:`PV_FORMATS`.
        q_block: query tokens sharing one quantisation scale (per batch and head).
        k_block: key tokens sharing one quantisation scale (per batch and kv head).
        smooth_k: subtract K's sequence mean before quantising (exact under softmax).
    """

    family: ClassVar[str] = "quantized"

    qk_format: str = "int8"
    pv_format: str = "fp16"
    q_block: int = 128
    k_block: int = 64
    smooth_k: bool = True

    def __post_init__(self) -> None:
        if self.qk_format not in QK_FORMATS:
            raise ValueError(
                f"Expected qk_format in {sorted(QK_FORMATS)}, but got qk_format={self.qk_format!r}. "
                "Pick one of the listed formats."
            )
        if self.pv_format not in PV_FORMATS:
            raise ValueError(
                f"Expected pv_format in {PV_FORMATS}, but got pv_format={self.pv_format!r}. "
                "Pick one of the listed formats."
            )
        for name in ("q_block", "k_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int, but got {name}={value!r}.")

    def describe(self) -> str:
        smooth = " smooth_k" if self.smooth_k else ""
        return f"qk={self.qk_format}/{self.q_block}x{self.k_block} pv={self.pv_format}{smooth}"


def qk_format_name(fmt: str) -> str:
    """``fmt`` as a key of :data:`QK_FORMATS` (aliases such as ``"fp8"`` resolved).

    Raises:
        ValueError: for a name neither in :data:`QK_FORMATS` nor in :data:`QK_FORMAT_ALIASES`.
    """
    name = QK_FORMAT_ALIASES.get(fmt, fmt)
    if name not in QK_FORMATS:
        raise ValueError(
            f"Expected a Q/K format in {sorted(QK_FORMATS)} (or an alias in {sorted(QK_FORMAT_ALIASES)}), "
            f"but got {fmt!r}. Pick one of the listed formats."
        )
    return name


def block_scales(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric quantisation scales ``amax / qmax``, and 1 wherever that is 0.

    The zero-block convention of every quantized kernel (Q/K blocks here, V channels in
    :func:`quantize_v`, the Triton quantiser alike). An all-zero block quantises to zeros
    whatever its scale, so outputs never depend on the choice; 1 is this family's long-standing
    rule, under which every saved plan's measured error was computed, it divides exactly, and
    unlike a clamp such as ``max(amax, 1e-12)`` it leaves the scale of tiny but nonzero blocks
    exact (a clamp would coarsen them), while also catching blocks whose ``amax / qmax``
    underflows to 0 (which would otherwise divide by zero).
    """
    scales = amax / qmax
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """K's float32 mean over the sequence, ``(B, H, D)``: what K smoothing subtracts."""
    return k.float().mean(dim=-2)


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """``k`` minus its mean over the sequence (dim -2), in float32, as a new tensor (never in place).

    Softmax is invariant to it: score row ``i`` changes by ``q_i · mean(k)`` for every key alike.
    Float32 whatever ``k``'s dtype, so a half-precision K loses nothing before quantisation and
    the fused Triton quantiser (which subtracts :func:`key_mean` in float32) computes the same.
    """
    return k.float() - key_mean(k).unsqueeze(-2)


def quantize_blocks(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block quantisation along the sequence (dim -2) of ``x`` ``(B, H, N, D)``.

    ``fmt`` is a :data:`QK_FORMATS` name or one of its :data:`QK_FORMAT_ALIASES`. Values are
    ``x / scale`` rounded to nearest and clamped to ``±qmax`` (int formats), or clamped and cast
    to e4m3 (fp8).

    Returns:
        ``(values, scales)``: ``values`` fp32 holding the quantised numbers (integers for int
        formats, e4m3-representable numbers for fp8) with ``x ≈ values * scale`` of its block;
        ``scales`` fp32 ``(B, H, ceil(N / block))`` (:func:`block_scales`: all-zero blocks get 1).
    """
    fmt = qk_format_name(fmt)
    qmax = QK_FORMATS[fmt]
    b, h, n, d = x.shape
    nblocks = -(-n // block)
    pad = nblocks * block - n
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    amax = padded.reshape(b, h, nblocks, block * d).abs().amax(dim=-1)
    scales = block_scales(amax, qmax)
    scaled = xf / scales.repeat_interleave(block, dim=-1)[..., :n, None]
    if fmt == "fp8_e4m3":
        values = scaled.clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
    else:
        values = scaled.round().clamp(-qmax, qmax)
    return values, scales


def quantize_p(p: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round P̃ (values in [0, 1], row max 1) to ``fmt``; fp8 values carry a static scale of 448.

    Returns fp32 values with ``p̃ ≈ p_q / 448`` for fp8 and ``p̃ ≈ p_q`` otherwise.
    """
    if fmt == "fp16":
        return p.half().float()
    if fmt == "fp8_e4m3":
        return (p.float() * _FP8_MAX).to(torch.float8_e4m3fn).float()
    return p.float()


def quantize_v(v: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round V to ``fmt`` for the P·V matmul.

    Returns:
        ``(v_q, out_scale)`` fp32 with ``p̃ @ v ≈ (quantize_p(p̃) @ v_q) * out_scale``; ``out_scale``
        is ``(B, H, 1, Dv)`` for fp8 (V's per-channel scale with P̃'s static 1/448 folded in) and
        ``None`` otherwise.
    """
    if fmt == "fp32":
        return v.float(), None
    if fmt == "fp16":
        return v.half().float(), None
    v_scale = block_scales(v.float().abs().amax(dim=-2, keepdim=True), _FP8_MAX)
    v_q = (v.float() / v_scale).to(torch.float8_e4m3fn).float()
    return v_q, v_scale / _FP8_MAX


def quantized_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: QuantizedConfig,
    *,
    scale: float,
    causal: bool = False,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a quantized variant computes, written plainly (see the module docstring).

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``.
        config: formats, block sizes and smoothing.
        scale: softmax scale (folded into Q before quantisation).
        causal, window: structural mask (bottom-right causal; window counts the diagonal).
        attn_mask: the model's mask, bool (True = attend) or additive, applied after dequantisation.

    Returns:
        ``(B, Hq, Nq, Dv)`` float32. Rows with no allowed key are zero.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
        >>> cfg = QuantizedConfig(qk_format="int16", pv_format="fp32")
        >>> ref = attention_reference(q, k, v, scale=8**-0.5)   # doctest: +SKIP
        >>> (quantized_reference(q, k, v, cfg, scale=8**-0.5) - ref).abs().max() < 1e-3  # doctest: +SKIP
        tensor(True)
    """
    heads = q.shape[1]
    k = smooth_keys(k) if config.smooth_k else k.float()
    q_vals, q_scales = quantize_blocks(q.float() * scale, config.q_block, config.qk_format)
    k_vals, k_scales = quantize_blocks(k, config.k_block, config.qk_format)
    k_vals = repeat_kv_heads(k_vals, heads)
    k_scales = repeat_kv_heads(k_scales.unsqueeze(-1), heads).squeeze(-1)
    # Integer-valued products summed in float64 are exact: the int32 accumulator of the kernel.
    acc = (q_vals.double() @ k_vals.double().transpose(-1, -2)).float()
    nq, nk = q.shape[-2], k.shape[-2]
    row_scale = q_scales.repeat_interleave(config.q_block, dim=-1)[..., :nq, None]
    col_scale = k_scales.repeat_interleave(config.k_block, dim=-1)[..., None, :nk]
    scores = acc * (row_scale * col_scale)
    neg_inf = torch.tensor(float("-inf"))
    structural = combined_allowed(nq, nk, causal=causal, window=window, device=q.device)
    if structural is not None:
        scores = torch.where(structural, scores, neg_inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, neg_inf)
        else:
            scores = scores + attn_mask.float()
    row_max = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - row_max).nan_to_num(0.0)
    denom = p.sum(dim=-1, keepdim=True)
    p_q = quantize_p(p, config.pv_format)
    v_q, v_scale = quantize_v(v, config.pv_format)
    v_q = repeat_kv_heads(v_q, heads)
    out = p_q @ v_q
    if v_scale is not None:
        out = out * repeat_kv_heads(v_scale, heads)
    return torch.where(denom > 0, out / denom.clamp_min(1e-30), torch.zeros_like(out))


class QuantizedFamily(Family):
    """SageAttention-style quantized attention; serves every rewritable site."""

    name = "quantized"
    config_type = QuantizedConfig

    #: The configs offered for every site: SageAttention 1 (INT8 Q·Kᵀ, FP16 P·V), the same
    #: with finer scale blocks (lower error, more scale traffic), and FP8 throughout (Hopper).
    DEFAULT_CONFIGS: ClassVar[tuple[QuantizedConfig, ...]] = (
        QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=128, k_block=64),
        QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=32, k_block=16),
        QuantizedConfig(qk_format="fp8_e4m3", pv_format="fp8_e4m3", q_block=128, k_block=64),
    )

    def candidates(self, site, stats) -> list[Candidate]:
        if self.unsupported_reason(site) is not None:
            return []
        return [
            Candidate(
                site=site.name,
                family=self.name,
                config=cfg,
                cost=self.cost(site, cfg),
                notes=f"{cfg.describe()}; error measured by the cost model",
            )
            for cfg in self.DEFAULT_CONFIGS
        ]

    def reference(self, q, k, v, candidate, *, scale, causal, attn_mask=None) -> torch.Tensor:
        if not isinstance(candidate.config, QuantizedConfig):
            raise TypeError(
                f"Expected a QuantizedConfig, but got {type(candidate.config).__name__}. "
                "Pass a candidate made by the quantized family."
            )
        out = quantized_reference(q, k, v, candidate.config, scale=scale, causal=causal, attn_mask=attn_mask)
        return out.to(v.dtype)

    def cost(self, site, config) -> CostFormula:
        """Dense FLOPs; bytes of the quantisation pass plus the attention pass at the formats' widths.

        Q and K are read once at the site's width ``E`` and written at the format's width by
        the quantise pass, then read again at that width; scales add one fp32 per block. V is
        read at ``E`` (fp16 P·V) or quantised like Q/K (fp8 P·V); the output is written at ``E``.
        """
        s = SYMBOLS
        density = sympy.Min(site.window, s["Nk"]) / s["Nk"] if site.window else 1
        dense = dense_cost(site, density=density)
        flops = dense.flops
        qk_b = _FORMAT_BYTES[config.qk_format]
        q_elems = s["B"] * s["H"] * s["Nq"] * s["D"]
        k_elems = s["B"] * s["Hkv"] * s["Nk"] * s["D"]
        v_elems = s["B"] * s["Hkv"] * s["Nk"] * s["Dv"]
        scales = 4 * (
            s["B"] * s["H"] * s["Nq"] / config.q_block + s["B"] * s["Hkv"] * s["Nk"] / config.k_block
        )
        qk_bytes = (s["E"] + 2 * qk_b) * (q_elems + k_elems) + 2 * scales
        if config.pv_format == "fp8_e4m3":
            v_bytes = (s["E"] + 2) * v_elems
        else:
            v_bytes = s["E"] * v_elems
        out_bytes = s["E"] * s["B"] * s["H"] * s["Nq"] * s["Dv"]
        return CostFormula(flops=flops, bytes=qk_bytes + v_bytes + out_bytes, scores=dense.scores)


register_family(QuantizedFamily())
