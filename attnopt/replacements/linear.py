"""Linear attention with Hedgehog feature maps fitted per site, optionally hybrid with a window.

A ``linear`` candidate replaces ``softmax(q kᵀ * scale)`` by feature-map attention

    out_i = Σ_j w_ij v_j / Σ_j w_ij,    w_ij = φ_q(q_i) · φ_k(k_j),

with Hedgehog's feature map per head ``φ(x) = [softmax(x W + b), softmax(-(x W + b))]`` (softmax
over the ``feature_dim`` features, so φ has ``2 * feature_dim`` positive entries). ``W``/``b``
are fitted separately for queries (per query head) and keys (per kv head) on the site's
calibration q/k, so that the normalised weights mimic that site's softmax rows (soft
cross-entropy on sampled query rows, Adam, fixed seed; seconds per site, no model training).

Hybrid (``window > 0``, causal sites only): query ``i`` (bottom-right aligned, at key position
``t = i + Nk - Nq``) attends exactly to the ``window`` keys ``(t - window, t]`` with weights
``exp(s_ij - m_i)`` (``m_i`` the max score over that window) and linearly to the keys before
them; one normaliser sums both. ``window >= Nk`` is therefore exact softmax attention.

The model's ``attn_mask`` multiplies the weights: bool masks by 0/1, additive masks by
``exp(mask)``. Kernels serve key-padding masks fast; arbitrary tensors and biases are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy
import torch

from attnopt.patterns.masks import causal_allowed, repeat_kv_heads
from attnopt.replacements.base import SYMBOLS, Candidate, CostFormula, Family, FamilyConfig, register_family

__all__ = [
    "LINEAR_EPS",
    "LinearConfig",
    "LinearFamily",
    "fit_feature_maps",
    "hedgehog_features",
    "init_feature_maps",
    "linear_feature_reference",
    "linear_reference",
    "normalise_rows",
]

#: What linear attention adds to its normaliser ``Σ_j w_ij`` before dividing: nothing. The
#: variant's meaning is the plain ratio; a row whose total weight is 0 (every key hidden) gives 0
#: rather than 0/0 (:func:`normalise_rows`). The reference, the CPU kernel and the Triton kernel
#: all default to this value, so measured errors and kernel outputs mean the same function.
LINEAR_EPS: float = 0.0

# Fitting budget: the first sequences and a prefix of each, so a site fits in seconds on a CPU
# (the loss is O(sequences * heads * query_samples * keys * 2F) per step).
_FIT_MAX_SEQUENCES = 1
_FIT_MAX_KEYS = 512


@dataclass(frozen=True)
class LinearConfig(FamilyConfig):
    """Settings of one linear-attention variant.

    Attributes:
        feature_dim: projections per head; φ has ``2 * feature_dim`` features.
        window: 0 for pure linear attention; > 0 for the hybrid with an exact causal window of
            that many keys (diagonal included).
        chunk: chunk length of the chunked causal kernel (a speed knob; results do not depend on it).
        fit_steps: Adam steps of the per-site fit.
        fit_lr: Adam learning rate.
        query_samples: query rows per calibration sequence used by the fit.
        seed: seed of the initial maps and the row sampling (fits are repeatable).
    """

    family: ClassVar[str] = "linear"

    feature_dim: int = 32
    window: int = 0
    chunk: int = 64
    fit_steps: int = 60
    fit_lr: float = 0.05
    query_samples: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("feature_dim", "chunk", "query_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int, but got {name}={value!r}.")
        for name in ("window", "fit_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Expected {name} to be a non-negative int, but got {name}={value!r}.")

    def describe(self) -> str:
        hybrid = f" window={self.window}" if self.window else ""
        return f"F={self.feature_dim}{hybrid} chunk={self.chunk}"


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map ``[softmax(xW + b), softmax(-(xW + b))]`` per head.

    Args:
        x: ``(B, H, N, D)``; weight: ``(H, D, F)``; bias: ``(H, F)``.

    Returns:
        ``(B, H, N, 2F)`` float32, positive, each half summing to 1.
    """
    z = torch.einsum("bhnd,hdf->bhnf", x.float(), weight.float()) + bias.float()[:, None, :]
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


def init_feature_maps(
    num_heads: int, num_kv_heads: int, head_dim: int, feature_dim: int, seed: int = 0
) -> list[torch.Tensor]:
    """Random (unfitted) maps ``[W_q, b_q, W_k, b_k]`` from ``seed``; the starting point of a fit."""
    gen = torch.Generator().manual_seed(seed)
    std = head_dim**-0.5
    w_q = torch.randn(num_heads, head_dim, feature_dim, generator=gen) * std
    w_k = torch.randn(num_kv_heads, head_dim, feature_dim, generator=gen) * std
    return [w_q, torch.zeros(num_heads, feature_dim), w_k, torch.zeros(num_kv_heads, feature_dim)]


def _mask_weights(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The multiplicative form of a mask: bool → 0/1, additive → exp(mask)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return attn_mask.float()
    return torch.exp(attn_mask.float())


def normalise_rows(num: torch.Tensor, den: torch.Tensor, eps: float = LINEAR_EPS) -> torch.Tensor:
    """``num / (den + eps)`` row by row, and 0 where that total is 0 (rows that see no key).

    ``den`` holds each row's total weight with a trailing dim of 1. Every linear kernel finishes
    with this, so they agree on the normaliser (:data:`LINEAR_EPS`) and on empty rows.
    """
    total = den + eps
    return torch.where(total > 0, num / total.clamp_min(1e-30), torch.zeros_like(num))


def _linear_weights(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    pos: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised weights ``(..., Nq', Nk)`` of queries at key positions ``pos`` ``(Nq',)``, masks aside.

    Without a window: ``φ_q·φ_k`` for keys ``j <= pos`` when causal, every key otherwise. With one
    (causal by definition): ``exp(s - m)`` for the window keys ``pos - window < j <= pos``, ``m``
    the max of ``s = scale · q·k`` over the window keys ``visible`` leaves (all when None), and
    ``φ_q·φ_k`` for the keys ``j <= pos - window`` before it. ``phi_k``/``k`` already have one head
    per query head. The one statement of the variant's weights: the reference and the fit use it.
    """
    j = torch.arange(phi_k.shape[-2], device=phi_k.device)[None, :]
    p = pos[:, None]
    lin = phi_q @ phi_k.transpose(-1, -2)
    if not window:
        return lin * (j <= p) if causal else lin
    in_window = (j <= p) & (j > p - window)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    seen = in_window if visible is None else in_window & visible
    scores = scores.masked_fill(~seen, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    return torch.exp(scores - row_max) + lin * (j <= p - window)


def linear_feature_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    eps: float = LINEAR_EPS,
) -> torch.Tensor:
    """Linear (or hybrid) attention from given features, in quadratic form: the variant below its feature map.

    Args:
        phi_q: ``(B, Hq, Nq, F)``; phi_k: ``(B, Hkv, Nk, F)``, non-negative; v: ``(B, Hkv, Nk, Dv)``.
        causal: bottom-right aligned causal constraint (a window implies it).
        window: the exact window (keys up to and including the diagonal), or None/0 for none.
        q, k: ``(B, Hq, Nq, D)``/``(B, Hkv, Nk, D)``, the raw inputs of the window's softmax scores.
        scale: their softmax scale; ``D ** -0.5`` when None.
        attn_mask: bool or additive, broadcastable to ``(B, Hq, Nq, Nk)``; it multiplies the weights.
        eps: added to the normaliser (:data:`LINEAR_EPS`, the family's, unless experimenting).

    Returns:
        ``(B, Hq, Nq, Dv)`` float32; rows with zero total weight are zero.

    Raises:
        ValueError: for a window without ``q`` and ``k``.
    """
    heads, nq, nk = phi_q.shape[1], phi_q.shape[-2], phi_k.shape[-2]
    if window and (q is None or k is None):
        raise ValueError(f"Expected q and k for the hybrid window={window}, but got none. Pass q=..., k=....")
    if window:
        k = repeat_kv_heads(k, heads)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = _mask_weights(attn_mask)
    pos = torch.arange(nq, device=phi_q.device) + (nk - nq)
    weights = _linear_weights(
        phi_q.float(), repeat_kv_heads(phi_k.float(), heads), q, k, pos, scale=scale, causal=causal,
        window=int(window or 0), visible=None if mask is None else mask > 0,
    )  # fmt: skip
    if mask is not None:
        weights = weights * mask
    out = weights @ repeat_kv_heads(v.float(), heads)
    return normalise_rows(out, weights.sum(dim=-1, keepdim=True), eps)


def linear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: list[torch.Tensor],
    config: LinearConfig,
    *,
    scale: float,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear (or hybrid) attention in quadratic form, written plainly (module docstring).

    Hedgehog features of ``params`` fed to :func:`linear_feature_reference`.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``.
        params: ``[W_q (Hq, D, F), b_q (Hq, F), W_k (Hkv, D, F), b_k (Hkv, F)]``.
        config: feature dim and hybrid window.
        scale: softmax scale (used by the hybrid window's exact part).
        causal: bottom-right aligned causal constraint.
        attn_mask: bool or additive, broadcastable to ``(B, Hq, Nq, Nk)``.

    Returns:
        ``(B, Hq, Nq, Dv)`` float32; rows with zero total weight are zero.

    Raises:
        ValueError: for a hybrid window on a non-causal call.
    """
    if config.window and not causal:
        raise ValueError(
            f"Expected a causal site for the hybrid window={config.window}, but got causal=False. "
            "Use window=0 for non-causal attention."
        )
    w_q, b_q, w_k, b_k = params
    phi_q = hedgehog_features(q, w_q, b_q)
    phi_k = hedgehog_features(k, w_k, b_k)
    return linear_feature_reference(
        phi_q, phi_k, v, causal=causal, window=config.window, q=q, k=k, scale=scale, attn_mask=attn_mask
    )


def _fit_rows(stats, config: LinearConfig, gen: torch.Generator):
    """Sampled (q rows, keys, target softmax rows, causal mask) per calibration sequence."""
    rows = []
    for q, k, _v, mask in list(stats.samples())[:_FIT_MAX_SEQUENCES]:
        nk = min(k.shape[-2], _FIT_MAX_KEYS)
        nq = min(q.shape[-2], nk) if q.shape[-2] == k.shape[-2] else q.shape[-2]
        q, k = q[..., :nq, :].float(), k[..., :nk, :].float()
        idx = torch.randperm(nq, generator=gen)[: config.query_samples].sort().values
        q_rows = q[:, :, idx]
        logits = (q_rows @ repeat_kv_heads(k, q.shape[1]).transpose(-1, -2)) * stats.scale
        allowed = None
        if stats.causal:
            allowed = causal_allowed(nq, nk)[idx]
        if mask is not None and q.shape[-2] == k.shape[-2] and mask.shape[-1] >= nk:
            m = mask[..., :nq, :nk].expand(*mask.shape[:-2], nq, nk)[..., idx, :]
            m = m if m.dtype == torch.bool else m > -1e3
            allowed = m if allowed is None else allowed & m
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        target = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        rows.append((q_rows, k, target, allowed, idx + (k.shape[-2] - nq)))
    return rows


def fit_feature_maps(stats, config: LinearConfig, num_kv_heads: int | None = None) -> list[torch.Tensor]:
    """Fit ``[W_q, b_q, W_k, b_k]`` on ``stats`` so linear weights mimic the site's softmax rows.

    Minimises the soft cross-entropy ``-Σ_j A_ij log Â_ij`` between the site's softmax rows
    ``A`` (sampled queries, causal/padding masks honoured) and the variant's normalised weights
    ``Â`` (hybrid included), with Adam for ``config.fit_steps`` steps from
    :func:`init_feature_maps`'s seeded start. Deterministic for a given seed. Only the first
    ``_FIT_MAX_SEQUENCES`` sequences and their first ``_FIT_MAX_KEYS`` tokens are used, which
    keeps a fit to seconds; the cost model measures the error on all calibration data.

    Raises:
        ValueError: if ``stats`` holds no q/k samples.
    """
    if not stats.q:
        raise ValueError(
            f"Expected calibration q/k samples for site {stats.site}, but got none. Calibrate first."
        )
    heads, head_dim = stats.q[0].shape[1], stats.q[0].shape[-1]
    kv_heads = num_kv_heads or stats.k[0].shape[1]
    params = init_feature_maps(heads, kv_heads, head_dim, config.feature_dim, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rows = _fit_rows(stats, config, gen)
    params = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(params, lr=config.fit_lr)
    with torch.enable_grad():
        for _ in range(config.fit_steps):
            opt.zero_grad(set_to_none=True)
            loss = sum(_row_loss(params, r, config, stats.scale) for r in rows) / len(rows)
            loss.backward()
            opt.step()
    return [p.detach().clone() for p in params]


def _row_loss(params, row, config: LinearConfig, scale: float) -> torch.Tensor:
    q_rows, k, target, allowed, pos = row
    w_q, b_q, w_k, b_k = params
    heads = q_rows.shape[1]
    phi_q = hedgehog_features(q_rows, w_q, b_q)
    phi_k = repeat_kv_heads(hedgehog_features(k, w_k, b_k), heads)
    k_rep = repeat_kv_heads(k, heads) if config.window else None
    # causality (when the site has it) is in ``allowed``; a window brings its own
    weights = _linear_weights(
        phi_q, phi_k, q_rows, k_rep, pos, scale=scale, causal=False, window=config.window, visible=allowed
    )
    if allowed is not None:
        weights = weights * allowed
    # -Σ_j A_ij log(w_ij / Σ w_i) = log Σ w_i - Σ_j A_ij log w_ij for rows with Σ_j A_ij = 1.
    has_target = target.sum(dim=-1) > 0
    log_norm = torch.log(weights.sum(dim=-1).clamp_min(1e-30))
    cross = (target * torch.log(weights.clamp_min(1e-30))).sum(dim=-1)
    return ((log_norm - cross) * has_target).sum() / has_target.sum().clamp_min(1)


class LinearFamily(Family):
    """Hedgehog linear attention (and the sliding-window hybrid) fitted per site."""

    name = "linear"
    config_type = LinearConfig

    def unsupported_reason(self, site) -> str | None:
        reason = super().unsupported_reason(site)
        if reason is not None:
            return reason
        if site.mask in ("tensor", "bias"):
            return (
                f"site {site.name} has a mask of kind {site.mask!r}, which linear attention cannot apply "
                "without the quadratic score matrix"
            )
        if site.mask == "sliding_window" or site.window:
            return f"site {site.name} has a sliding-window mask; block_sparse serves it exactly"
        return None

    def configs(self, site) -> list[LinearConfig]:
        """The configs offered for ``site``: pure linear, plus a 64-key hybrid on causal sites."""
        cfgs = [LinearConfig(feature_dim=32)]
        if site.causal and site.kv_len > 128:
            cfgs.append(LinearConfig(feature_dim=32, window=64))
        return cfgs

    def candidates(self, site, stats) -> list[Candidate]:
        if self.unsupported_reason(site) is not None or not stats.q:
            return []
        out = []
        for cfg in self.configs(site):
            params = fit_feature_maps(stats, cfg, num_kv_heads=site.num_kv_heads)
            out.append(
                Candidate(
                    site=site.name,
                    family=self.name,
                    config=cfg,
                    params=params,
                    cost=self.cost(site, cfg),
                    notes=f"{cfg.describe()}; feature maps fitted in {cfg.fit_steps} steps",
                )
            )
        return out

    def reference(self, q, k, v, candidate, *, scale, causal, attn_mask=None) -> torch.Tensor:
        if not isinstance(candidate.config, LinearConfig):
            raise TypeError(
                f"Expected a LinearConfig, but got {type(candidate.config).__name__}. "
                "Pass a candidate made by the linear family."
            )
        out = linear_reference(
            q, k, v, candidate.params, candidate.config, scale=scale, causal=causal, attn_mask=attn_mask
        )
        return out.to(v.dtype)

    def cost(self, site, config) -> CostFormula:
        """FLOPs of the chunked algorithm and bytes of one pass over q, k, v and the output.

        Features: ``2·D·F`` per token for the projection plus ~10 per feature for the two
        softmaxes. Non-causal: one ``F2 x Dv`` state per kv head (``2·F2·Dv`` per key) and
        ``2·F2·(Dv + 1)`` per query. Causal: the same plus an intra-chunk ``C x C`` block per
        chunk (``2·C·(F2 + Dv)`` per query). The hybrid adds an exact band of ``window + C``
        keys per query.
        """
        s = SYMBOLS
        f2 = 2 * config.feature_dim
        c = config.chunk
        q_tok = s["B"] * s["H"] * s["Nq"]
        k_tok = s["B"] * s["Hkv"] * s["Nk"]
        flops = (q_tok + k_tok) * (2 * s["D"] * config.feature_dim + 10 * f2)
        flops += k_tok * 2 * f2 * s["Dv"] + q_tok * 2 * f2 * (s["Dv"] + 1)
        if site.causal:
            flops += q_tok * 2 * c * (f2 + s["Dv"])
        scores = sympy.Integer(0)
        if config.window:
            band = sympy.Min(config.window + c, s["Nk"])
            flops += q_tok * band * (2 * s["D"] + 2 * s["Dv"] + 5)
            scores = q_tok * band
        param_bytes = 4 * (s["H"] + s["Hkv"]) * (s["D"] + 1) * config.feature_dim
        nbytes = s["E"] * (q_tok * (s["D"] + s["Dv"]) + k_tok * (s["D"] + s["Dv"])) + param_bytes
        return CostFormula(flops=flops, bytes=nbytes, scores=scores)


register_family(LinearFamily())
