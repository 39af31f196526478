"""Exact attention: the definition every variant is measured against.

``attention_reference`` is the ground truth of the whole library: a plain, float64-capable
softmax attention with attnopt's conventions (bottom-right causal alignment, sliding windows
counted including the diagonal, GQA by key/value groups, boolean or additive masks). The fast
exact path (SDPA with the best backend) lives in :mod:`attnopt.codegen`; this module is slow
on purpose and obviously correct.
"""

from __future__ import annotations

import torch

from attnopt.patterns.masks import combined_allowed, repeat_kv_heads  # re-exported: part of this module's API

__all__ = ["attention_reference", "repeat_kv_heads", "combined_allowed"]


#: Largest block of scores the reference forms at once (16M elements: 128 MiB in float64).
REFERENCE_BLOCK_ELEMENTS = 1 << 24


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """Softmax attention computed the obvious way, in the inputs' dtype.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``.
        attn_mask: broadcastable to ``(B, Hq, Nq, Nk)``; bool (True = attend) or additive float.
        scale: factor on ``q @ k^T``; ``None`` means ``D ** -0.5``.
        causal: bottom-right aligned causal constraint.
        window: keys visible per query, counted up to and including the diagonal.

    Returns:
        ``(B, Hq, Nq, Dv)``. Rows with no allowed key are zero (not NaN).
    """
    num_heads = q.shape[1]
    k = repeat_kv_heads(k, num_heads)
    v = repeat_kv_heads(v, num_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nq, nk = q.shape[-2], k.shape[-2]
    structural = combined_allowed(nq, nk, causal=causal, window=window, device=q.device)
    if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == 1:
        attn_mask = attn_mask.expand(*attn_mask.shape[:-2], nq, attn_mask.shape[-1])
    # Query rows in blocks of at most REFERENCE_BLOCK_ELEMENTS scores: rows are independent, and
    # a float64 reference at N=8192 would otherwise build several (B, H, N, N) tensors at once.
    step = max(1, REFERENCE_BLOCK_ELEMENTS // max(q.shape[0] * num_heads * nk, 1))
    out = []
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        scores = (q[..., lo:hi, :] @ k.transpose(-1, -2)) * scale
        neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
        if structural is not None:
            scores = torch.where(structural[lo:hi], scores, neg_inf)
        if attn_mask is not None:
            m = attn_mask[..., lo:hi, :] if attn_mask.dim() >= 2 else attn_mask
            if m.dtype == torch.bool:
                scores = torch.where(m, scores, neg_inf)
            else:
                scores = scores + m.to(scores.dtype)
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(v.dtype)
        del scores
        out.append(probs @ v)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


# --- the exact family ---------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402

import sympy  # noqa: E402

from attnopt.replacements.base import (  # noqa: E402
    SYMBOLS,
    Candidate,
    CostFormula,
    Family,
    FamilyConfig,
    register_family,
)


@dataclass(frozen=True)
class ExactConfig(FamilyConfig):
    """Exact attention has no settings; the fastest dense backend is picked at run time."""

    family = "exact"


def dense_cost(site, density: sympy.Expr | float = 1) -> CostFormula:
    """FLOPs/bytes of dense attention over a ``density`` share of the score matrix.

    Two matmuls of ``Nq x Nk`` scores (``2*D`` and ``2*Dv`` FLOPs per score) plus the softmax
    (~5 FLOPs per score); a causal site computes about half the scores. Bytes: q, k, v read
    once and the output written once.
    """
    s = SYMBOLS
    scores = s["B"] * s["H"] * s["Nq"] * s["Nk"] * density
    if site.causal and not site.window:
        scores = scores / 2
    flops = scores * (2 * s["D"] + 2 * s["Dv"] + 5)
    nbytes = (
        s["E"] * s["B"] * (s["H"] * s["Nq"] * (s["D"] + s["Dv"]) + s["Hkv"] * s["Nk"] * (s["D"] + s["Dv"]))
    )
    return CostFormula(flops=flops, bytes=nbytes, scores=scores)


class ExactFamily(Family):
    """Always a candidate; choosing it everywhere reproduces the original outputs."""

    name = "exact"
    config_type = ExactConfig

    def unsupported_reason(self, site) -> str | None:
        return None

    def candidates(self, site, stats) -> list[Candidate]:
        return [
            Candidate(
                site=site.name,
                family=self.name,
                config=ExactConfig(),
                cost=self.cost(site, ExactConfig()),
                error=0.0,
            )
        ]

    def reference(self, q, k, v, candidate, *, scale, causal, attn_mask=None):
        return attention_reference(q, k, v, attn_mask, scale=scale, causal=causal)

    def cost(self, site, config) -> CostFormula:
        if site.window:
            w = sympy.Min(site.window, SYMBOLS["Nk"])
            return dense_cost(site, density=w / SYMBOLS["Nk"])
        return dense_cost(site)


register_family(ExactFamily())
