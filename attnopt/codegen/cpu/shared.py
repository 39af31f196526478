"""CPU kernel of ``attnopt::shared``: scores for the cluster representatives only, then P @ V for all.

Clusters of equal size ``m`` are batched together: their representatives' queries and keys form
a ``(B, n, N, D)`` problem and the members' values are laid side by side into a
``(B, n, Nk, m * Dv)`` tensor, so one score matrix per cluster multiplies every member's values
in one matmul. That is the FLOP cut the family promises: ``C`` instead of ``H`` ``Q K^T`` and
softmax passes.

SDPA's CPU flash kernel needs ``Dv == D``, and side-by-side values break that (it falls back to
the math path, ~9x slower on this machine), so the attention of clusters with two or more
members is a query-chunked softmax written in torch: each chunk's score tile is bounded (:data:`_TILE_ELEMENTS`), causal and window
chunks only visit the keys they can see, and the softmax normaliser is applied to the
``(chunk, m * Dv)`` output rather than to the ``(chunk, Nk)`` probabilities. Singleton clusters
share nothing and run SDPA's flash kernel (through :func:`~attnopt.codegen.ops.exact_attention`)
when no row can be left without keys.
"""

from __future__ import annotations

import functools

import torch

from attnopt.codegen.ops import AttentionCall, exact_attention, register_kernel
from attnopt.replacements.shared import SharedConfig

__all__ = ["shared_attention", "shared_attention_cpu", "size_groups"]

#: Score elements per tile (heads x query rows x keys): 4 MB of fp32.
_TILE_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=256)
def _groups_for(cfg: SharedConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return size_groups(cfg.clusters, cfg.representatives)


def size_groups(
    clusters: tuple[tuple[int, ...], ...], representatives: tuple[int, ...]
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Clusters batched by size: ``(reps (n,), members (n, m))`` int64 pairs, one per distinct size ``m``."""
    by_size: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for cluster, rep in zip(clusters, representatives):
        by_size.setdefault(len(cluster), []).append((rep, cluster))
    return tuple(
        (torch.tensor([r for r, _ in items]), torch.tensor([list(c) for _, c in items]))
        for _, items in sorted(by_size.items())
    )


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    *,
    scale: float,
    causal: bool,
    window: int | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shared-score attention; equals :meth:`SharedFamily.reference` for the same clusters.

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``.
        groups: from :func:`size_groups`; together the members cover every query head once.
        scale, causal, window, attn_mask: attnopt's conventions (window implies causal; the
            mask broadcasts to ``(B, H, Nq, Nk)``, bool = attend or additive float).

    Returns:
        ``(B, H, Nq, Dv)``, float32 for half inputs (the operator casts back), else ``v``'s dtype.
    """
    b, heads, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if heads % hkv:
        raise ValueError(f"Expected query heads divisible by kv heads, but got {heads} and {hkv}.")
    n_rep = heads // hkv
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    mask = (
        None
        if attn_mask is None
        else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    )
    out = q.new_empty((b, heads, nq, dv), dtype=work)
    for reps, members in groups:
        reps, members = reps.to(q.device), members.to(q.device)
        n, m = members.shape
        if m == 1 and mask is None and dv == q.shape[-1] and nq <= nk:
            # Singletons share nothing: SDPA's flash kernel (~2x this file's path per FLOP) runs them.
            call = AttentionCall(
                q[:, reps].to(work), k[:, reps // n_rep].to(work), v[:, reps // n_rep].to(work),
                None, [], scale, causal or bool(window), window, {},
            )  # fmt: skip
            out[:, reps] = exact_attention(call)
            continue
        q_r = q[:, reps].to(work) * scale
        # K^T laid out contiguously once per group: BLAS runs Q K^T ~1.8x faster than on a transposed view.
        k_t = k[:, reps // n_rep].to(work).transpose(-1, -2).contiguous()
        # (B, n, m, Nk, Dv) -> (B, n, Nk, m * Dv): every member's values side by side.
        v_cat = v[:, (members // n_rep).flatten()].to(work).view(b, n, m, nk, dv).permute(0, 1, 3, 2, 4)
        v_cat = v_cat.reshape(b, n, nk, m * dv)
        mask_r = mask[:, reps] if mask is not None and mask.shape[1] > 1 else mask
        o = _chunked_softmax_attention(q_r, k_t, v_cat, mask_r, causal=causal or bool(window), window=window)
        o = o.view(b, n, nq, m, dv).transpose(2, 3).reshape(b, n * m, nq, dv)
        flat = members.flatten()
        if len(groups) == 1 and bool((flat == torch.arange(heads, device=flat.device)).all()):
            return o  # members already in head order: no scatter
        out[:, flat] = o
    return out


def _chunked_softmax_attention(
    q: torch.Tensor,
    k_t: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """``softmax(q k^T + mask) v`` (q pre-scaled, ``k_t = k^T``) in query chunks over only the visible keys."""
    b, n, nq, _ = q.shape
    nk = k_t.shape[-1]
    offset = nk - nq  # bottom-right alignment: query i's diagonal is key i + offset
    out = q.new_empty((b, n, nq, v.shape[-1]))
    rows = max(16, _TILE_ELEMENTS // max(b * n * nk, 1))
    for start in range(0, nq, rows):
        stop = min(start + rows, nq)
        k_hi = min(nk, stop + offset) if causal else nk
        k_lo = max(0, start + offset - window + 1) if window else 0
        if k_hi <= k_lo:
            out[:, :, start:stop] = 0  # no query of the chunk sees a key
            continue
        scores = q[:, :, start:stop] @ k_t[..., k_lo:k_hi]
        if causal:
            _mask_band_edges(scores, start, stop, k_lo, k_hi, offset, window)
        if mask is not None:
            tile = mask[..., start:stop, k_lo:k_hi] if mask.shape[-2] > 1 else mask[..., k_lo:k_hi]
            if tile.dtype == torch.bool:
                scores.masked_fill_(~tile, float("-inf"))
            else:
                scores.add_(tile.to(scores.dtype))
        m_i = scores.amax(dim=-1, keepdim=True)
        m_i = torch.where(torch.isfinite(m_i), m_i, torch.zeros_like(m_i))
        p = scores.sub_(m_i).exp_()
        l_i = p.sum(dim=-1, keepdim=True)
        acc = p @ v[:, :, k_lo:k_hi]
        out[:, :, start:stop] = acc.div_(torch.where(l_i > 0, l_i, torch.ones_like(l_i)))
    return out


def _mask_band_edges(
    scores: torch.Tensor, start: int, stop: int, k_lo: int, k_hi: int, offset: int, window: int | None
) -> None:
    """Hide keys past each row's diagonal (and before its window) in a chunk's ``[k_lo, k_hi)`` tile.

    Only the columns right of the chunk's first diagonal, and left of its last window start,
    can hold hidden pairs, so only those two thin slices are touched.
    """
    i = torch.arange(start, stop, device=scores.device)[:, None] + offset
    diag = max(k_lo, start + offset + 1)
    if diag < k_hi:
        j = torch.arange(diag, k_hi, device=scores.device)[None, :]
        scores[..., diag - k_lo :].masked_fill_(j > i, float("-inf"))
    if window:
        edge = min(k_hi, stop - 1 + offset - window + 1)
        if edge > k_lo:
            j = torch.arange(k_lo, edge, device=scores.device)[None, :]
            scores[..., : edge - k_lo].masked_fill_(j <= i - window, float("-inf"))


@register_kernel("shared", "cpu")
def shared_attention_cpu(call: AttentionCall) -> torch.Tensor:
    """The ``attnopt::shared`` CPU kernel: clusters from the op's config (cached per config)."""
    groups = _groups_for(call.family_config(SharedConfig))
    heads = call.q.shape[1]
    covered = sum(int(members.numel()) for _, members in groups)
    if covered != heads or (call.params and call.params[0].numel() != heads):
        raise ValueError(
            f"Expected the shared config of site {call.config.get('site', '?')} to cover {heads} query heads, "
            f"but its clusters cover {covered}. Re-plan the site for this model."
        )
    return shared_attention(
        call.q,
        call.k,
        call.v,
        groups,
        scale=call.scale,
        causal=call.causal,
        window=call.window,
        attn_mask=call.attn_mask,
    )
