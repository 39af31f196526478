"""CPU kernel of ``attnopt::shared``: scores for the cluster representatives only, then P @ V for all.

Clusters of equal size ``m`` are batched together: their representatives' queries and keys form
a ``(B, n, N, D)`` problem and the members' values are laid side by side into a
``(B, n, Nk, m * Dv)`` tensor, so one score matrix per cluster multiplies every member's values
in one matmul. That is the FLOP cut the family promises: ``C`` instead of ``H`` ``Q K^T`` and
softmax passes.

SDPA's CPU flash kernel needs ``Dv == D``, and side-by-side values break that (it falls back to
the math path, ~9x slower on this machine), so the attention of clusters with two or more
members runs on the CPU band engine (:func:`attnopt.codegen.cpu.band.band_attention`): query
chunks whose score tile is bounded (:data:`_TILE_ELEMENTS`), over only the keys each chunk can
see, with the softmax normaliser applied to the ``(chunk, m * Dv)`` output rather than to the
``(chunk, Nk)`` probabilities; sliding windows take its strided band path. Singleton clusters
share nothing and run SDPA's flash kernel (through :func:`~attnopt.codegen.ops.exact_attention`)
when no row can be left without keys.
"""

from __future__ import annotations

import functools

import torch

from attnopt.codegen.cpu.band import band_attention
from attnopt.codegen.ops import AttentionCall, exact_attention, register_kernel
from attnopt.replacements.shared import SharedConfig

__all__ = ["shared_attention", "shared_attention_cpu", "size_groups"]

#: Score elements per tile of the band engine (query rows x keys of one head): 4 MB of fp32. Read at
#: call time.
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
        q_r = q[:, reps].to(work)
        k_r = k[:, reps // n_rep].to(work)
        # (B, n, m, Nk, Dv) -> (B, n, Nk, m * Dv): every member's values side by side.
        v_cat = v[:, (members // n_rep).flatten()].to(work).view(b, n, m, nk, dv).permute(0, 1, 3, 2, 4)
        v_cat = v_cat.reshape(b, n, nk, m * dv)
        mask_r = mask[:, reps] if mask is not None and mask.shape[1] > 1 else mask
        o = band_attention(
            q_r, k_r, v_cat, scale=scale, window=window, causal=causal or bool(window), attn_mask=mask_r,
            max_tile=_TILE_ELEMENTS,
        )  # fmt: skip
        o = o.view(b, n, nq, m, dv).transpose(2, 3).reshape(b, n * m, nq, dv)
        flat = members.flatten()
        if len(groups) == 1 and bool((flat == torch.arange(heads, device=flat.device)).all()):
            return o  # members already in head order: no scatter
        out[:, flat] = o
    return out


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
