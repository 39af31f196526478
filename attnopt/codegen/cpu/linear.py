"""CPU kernel of ``attnopt::linear``: chunked causal linear attention (+ exact sliding window).

Semantics are :func:`attnopt.replacements.linear.linear_reference`; this computes them in
``O(N · (C + F2) · Dv)`` instead of ``O(N²)``:

* **non-causal**: one state ``Σ_j φ(k_j) [v_j, 1]ᵀ`` (``F2 x (Dv + 1)``) per kv head; every query
  reads it. The appended ones column carries the normaliser through the same matmul.
* **causal** (query ``i`` sees keys ``j <= i + d``): keys before ``d`` form a prefix state; the
  rest are aligned with queries and split into chunks of ``C``. Chunk states are an exclusive
  cumulative sum of per-chunk ``φ(K_c)ᵀ [V_c, 1]``; inside a chunk a lower-triangular ``C x C``
  block is computed quadratically. ``d = Nk - Nq`` (bottom-right) for pure linear attention
  and ``Nk - Nq - window`` for the linear part of the hybrid.
* **hybrid**: the exact window ``(t - window, t]`` is the CPU band engine's unnormalised output
  (:func:`attnopt.codegen.cpu.band.band_attention` with ``normalize=False``: chunks of ``C``
  queries over strided views of their ``C + window - 1`` keys, weighted ``exp(s - m)`` with ``m``
  the row max over the window) on ``[v, 1]``, summed into the same numerator and normaliser.

GQA keeps one state per kv head and folds the query heads of a group into the matmuls. Key
padding masks scale φ(k) (and the band weights); any other mask falls back to the quadratic
reference, which is correct but slow (the planner never offers linear for such sites).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.codegen.cpu.band import band_attention
from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.patterns.masks import additive_to_allowed, causal_allowed, merge_allowed, window_allowed
from attnopt.replacements.linear import LinearConfig, hedgehog_features, linear_reference, normalise_rows

__all__ = ["linear_attention_cpu", "linear_kernel"]


def _key_padding(mask: torch.Tensor, nq: int, nk: int, causal: bool) -> tuple[torch.Tensor, bool] | None:
    """``(keep (B', H', Nk) float, causal)`` when ``mask`` only hides keys (up to causality), else None."""
    allowed = additive_to_allowed(mask)
    if allowed is None:
        return None
    allowed = allowed.expand(*allowed.shape[:-2], nq, nk)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    keys = allowed.any(dim=-2)
    if bool((allowed == keys[..., None, :]).all()):
        return keys.float(), causal
    if bool((allowed == (keys[..., None, :] & causal_allowed(nq, nk))).all()):
        return keys.float(), True
    return None


def _causal_linear(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v1: torch.Tensor, d: int, chunk: int
) -> torch.Tensor:
    """Σ_{j <= i + d} (φ_q(i)·φ_k(j)) [v_j, 1] for every query i, chunked.

    Shapes: phi_q ``(B, Hkv, G, Nq, F2)``, phi_k ``(B, Hkv, Nk, F2)``, v1 ``(B, Hkv, Nk, Dv+1)``.
    Returns ``(B, Hkv, G, Nq, Dv+1)``.
    """
    b, hkv, g, nq, f2 = phi_q.shape
    nk, dv1 = phi_k.shape[2], v1.shape[-1]
    # Aligned keys: key j sits at query position j - d; keys before position 0 are a prefix.
    prefix = max(0, min(d, nk))
    state0 = phi_k[:, :, :prefix].transpose(-1, -2) @ v1[:, :, :prefix] if prefix else None
    lo, hi = max(d, 0), min(nk, nq + d)
    nc = -(-nq // chunk)
    length = nc * chunk
    # Key j sits at aligned position j - d: pad in front (d < 0) or slice (d > 0), pad to length.
    k_al = (
        F.pad(phi_k[:, :, lo:hi], (0, 0, lo - d, length - (hi - d)))
        if hi > lo
        else phi_k.new_zeros(b, hkv, length, f2)
    )
    v_al = (
        F.pad(v1[:, :, lo:hi], (0, 0, lo - d, length - (hi - d)))
        if hi > lo
        else v1.new_zeros(b, hkv, length, dv1)
    )
    q_c = F.pad(phi_q, (0, 0, 0, length - nq)).reshape(b, hkv, g, nc, chunk, f2)
    k_c = k_al.reshape(b, hkv, nc, chunk, f2)
    v_c = v_al.reshape(b, hkv, nc, chunk, dv1)
    kv = (k_c.transpose(-1, -2) @ v_c).reshape(b * hkv, nc, f2 * dv1)  # per-chunk φ(K_c)ᵀ [V_c, 1]
    # Exclusive prefix sum over chunks (state before each chunk), plus the prefix keys.
    states = F.pad(torch.cumsum(kv[:, :-1], dim=1), (0, 0, 1, 0)).reshape(b, hkv, nc, f2, dv1)
    if prefix:
        states = states + state0[:, :, None]
    out = q_c @ states[:, :, None]  # inter-chunk
    scores = q_c @ k_c.transpose(-1, -2)[:, :, None]  # (B, Hkv, G, nc, C, C)
    scores.mul_(torch.ones(chunk, chunk, dtype=scores.dtype).tril())
    out.add_(scores @ v_c[:, :, None])
    return out.reshape(b, hkv, g, length, dv1)[..., :nq, :]


def linear_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: list[torch.Tensor],
    cfg: LinearConfig,
    *,
    scale: float,
    causal: bool,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked linear / hybrid attention; equals :func:`linear_reference` up to fp32 rounding.

    Returns ``(B, Hq, Nq, Dv)`` float32.
    """
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if hq % hkv:
        raise ValueError(f"Expected query heads divisible by key/value heads, but got {hq} and {hkv}.")
    if cfg.window and not causal:
        raise ValueError(
            f"Expected a causal call for the hybrid window={cfg.window}, but got causal=False. "
            "Use window=0 for non-causal attention."
        )
    keep = band_keep = None
    if attn_mask is not None:
        padding = _key_padding(attn_mask, nq, nk, causal)
        if padding is None:
            return linear_reference(q, k, v, params, cfg, scale=scale, causal=causal, attn_mask=attn_mask)
        keep, causal = padding
        if keep.shape[1] > 1 and hkv != hq:  # per-query-head key masks: give every head its own kv
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            params = [
                params[0],
                params[1],
                params[2].repeat_interleave(hq // hkv, 0),
                params[3].repeat_interleave(hq // hkv, 0),
            ]
            hkv = hq
        band_keep = keep[:, :, None, :] > 0  # (B|1, 1|Hq, 1, Nk): the window's key mask
        keep = keep.expand(b, hkv, nk)
    groups = hq // hkv
    w_q, b_q, w_k, b_k = params
    phi_q = hedgehog_features(q, w_q, b_q).reshape(b, hkv, groups, nq, -1)
    phi_k = hedgehog_features(k, w_k, b_k)
    v1 = torch.cat([v.float(), v.new_ones(b, hkv, nk, 1, dtype=torch.float32)], dim=-1)
    if keep is not None:
        phi_k = phi_k * keep[..., None]
    if not causal:
        state = phi_k.transpose(-1, -2) @ v1  # (B, Hkv, F2, Dv+1)
        acc = phi_q @ state[:, :, None]
    else:
        acc = _causal_linear(phi_q, phi_k, v1, nk - nq - cfg.window, cfg.chunk)
        if cfg.window:
            band = band_attention(
                q.float(), k.float(), v1, scale=scale, window=cfg.window, attn_mask=band_keep, chunk=cfg.chunk,
                normalize=False,
            )  # fmt: skip
            acc = acc + band.reshape(b, hkv, groups, nq, dv + 1)
    num, den = acc[..., :dv], acc[..., dv:]
    out = normalise_rows(num, den)
    return out.reshape(b, hq, nq, dv)


@register_kernel("linear", "cpu")
def linear_kernel(call: AttentionCall) -> torch.Tensor:
    """``attnopt::linear`` on CPU tensors (see the module docstring)."""
    cfg = call.family_config(LinearConfig)
    mask, causal = call.attn_mask, call.causal
    if call.window:  # a site window the planner should not have sent here: stay correct, slowly
        win = window_allowed(call.q.shape[-2], call.k.shape[-2], call.window)
        mask = merge_allowed(mask, win)
        causal = True
        out = linear_reference(
            call.q, call.k, call.v, call.params, cfg, scale=call.scale, causal=causal, attn_mask=mask
        )
    else:
        out = linear_attention_cpu(
            call.q, call.k, call.v, call.params, cfg, scale=call.scale, causal=causal, attn_mask=mask
        )
    return out.to(call.v.dtype)
