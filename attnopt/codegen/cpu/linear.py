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
* **hybrid**: the exact window ``(t - window, t]`` of each query chunk is a band of
  ``C + window - 1`` keys taken with ``unfold`` (a view), weighted ``exp(s - m)`` with ``m``
  the band's row max, and summed into the same numerator and normaliser.

GQA keeps one state per kv head and folds the query heads of a group into the matmuls. Key
padding masks scale φ(k) (and the band weights); any other mask falls back to the quadratic
reference, which is correct but slow (the planner never offers linear for such sites).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.patterns.masks import additive_to_allowed, causal_allowed, merge_allowed, window_allowed
from attnopt.replacements.linear import LinearConfig, hedgehog_features, linear_reference

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


def _window_band(
    q: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    scale: float,
    window: int,
    chunk: int,
) -> torch.Tensor:
    """Σ over the exact window of exp(s_ij - m_i) [v_j, 1], chunk by chunk.

    Keys are laid out chunk-major and aligned with the queries (key ``j`` at query position
    ``j - (Nk - Nq)``), padded in front by ``nb`` chunks, so query chunk ``c`` sees key chunks
    ``c .. c + nb`` of the padded sequence: ``nb + 1`` batched matmuls over contiguous slices,
    with no copies of overlapping bands.

    Shapes: q ``(B, Hkv, G, Nq, D)``, k ``(B, Hkv, Nk, D)``, v1 ``(B, Hkv, Nk, Dv+1)``, keep
    ``(B, Hkv, Nk)`` or None. Returns ``(B, Hkv, G, Nq, Dv+1)``.
    """
    b, hkv, g, nq, d = q.shape
    nk, dv1 = k.shape[2], v1.shape[-1]
    nc = -(-nq // chunk)
    nb = -(-(window - 1) // chunk)
    total = (nc + nb) * chunk
    front = nb * chunk - (nk - nq)  # padded index of key j is j + front
    valid = keep if keep is not None else k.new_ones(1, 1, nk).expand(b, hkv, nk)

    def chunk_major(x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, Hkv, Nk, ...) aligned and padded to ``total`` keys, as (nc + nb, B, Hkv, C, ...)."""
        tail = (0, 0) if x.dim() == 4 else ()  # F.pad pairs run from the last dim backwards
        x = x[:, :, -front:] if front < 0 else F.pad(x, (*tail, front, 0))
        x = F.pad(x, (*tail, 0, total - x.shape[2])) if x.shape[2] < total else x[:, :, :total]
        x = x.reshape(b, hkv, nc + nb, chunk, *x.shape[3:])
        return x.movedim(2, 0).contiguous()

    k_c, v_c, ok_c = chunk_major(k), chunk_major(v1), chunk_major(valid)
    q_c = F.pad(q * scale, (0, 0, 0, nc * chunk - nq)).reshape(b, hkv, g, nc, chunk, d)
    q_c = q_c.permute(3, 0, 1, 2, 4, 5).reshape(nc, b, hkv, g * chunk, d)
    scores = torch.cat([q_c @ k_c[o : o + nc].transpose(-1, -2) for o in range(nb + 1)], dim=-1)
    rows = torch.arange(chunk).repeat(g)[:, None]  # query offset inside its chunk
    cols = torch.arange((nb + 1) * chunk)[None, :] - nb * chunk  # key offset from the chunk start
    in_band = (cols <= rows) & (cols > rows - window)
    ok = torch.cat([ok_c[o : o + nc] for o in range(nb + 1)], dim=-1)[:, :, :, None, :] > 0
    scores.masked_fill_(~(in_band & ok), float("-inf"))  # hidden keys get weight exp(-inf) = 0
    row_max = scores.amax(dim=-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)
    weights = scores.sub_(row_max).exp_()
    out = weights[..., :chunk] @ v_c[:nc]
    for o in range(1, nb + 1):
        out.add_(weights[..., o * chunk : (o + 1) * chunk] @ v_c[o : o + nc])
    out = out.reshape(nc, b, hkv, g, chunk, dv1).permute(1, 2, 3, 0, 4, 5)
    return out.reshape(b, hkv, g, nc * chunk, dv1)[..., :nq, :]


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
    keep = None
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
            q_g = q.float().reshape(b, hkv, groups, nq, -1)
            acc = acc + _window_band(
                q_g, k.float(), v1, keep, scale=scale, window=cfg.window, chunk=cfg.chunk
            )
    num, den = acc[..., :dv], acc[..., dv:]
    out = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
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
