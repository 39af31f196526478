"""Sites and calibration records built from tensors instead of a model.

Profiling needs a site and its statistics to ask every family for candidates at a chosen shape;
tests and benchmarks need the same without running the calibration engine. The statistics are
computed exactly as :class:`~attnopt.calibration.stats.SiteStats` documents them, from the
full attention rows of the given q/k/v (fine at the short lengths these helpers are used for).
"""

from __future__ import annotations

import math

import torch

from attnopt.patterns.masks import combined_allowed, repeat_kv_heads
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.site_stats import SiteStats

__all__ = ["attention_statistics", "make_site", "make_stats", "structured_qkv"]


def make_site(
    name: str = "synthetic#0",
    *,
    heads: int = 4,
    kv_heads: int | None = None,
    seq: int = 256,
    kv_seq: int | None = None,
    head_dim: int = 64,
    batch: int = 1,
    causal: bool = True,
    window: int | None = None,
    dtype: str = "float32",
) -> AttentionSite:
    """An :class:`AttentionSite` for a self-attention of the given shape (no graph behind it)."""
    mask = "sliding_window" if window else ("causal" if causal else "none")
    return AttentionSite(
        name=name,
        module_path=name.split("#")[0],
        index=0,
        pattern="synthetic",
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        head_dim=head_dim,
        head_dim_v=head_dim,
        q_len=seq,
        kv_len=kv_seq or seq,
        batch=batch,
        causal=causal or bool(window),
        scale=head_dim**-0.5,
        mask=mask,
        window=window,
        dtype=dtype,
    )


def structured_qkv(
    site: AttentionSite, *, generator: torch.Generator | None = None, locality: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v of one sequence with language-model-like structure (sinks and locality).

    Pure Gaussian q/k give near-uniform attention, which no approximation family is designed
    for; adding a shared direction to the first key (a sink) and a slowly rotating positional
    component (locality) gives maps with the sink/diagonal mass real models show.
    """
    h, hkv, n, nk, d = site.num_heads, site.num_kv_heads, site.q_len, site.kv_len, site.head_dim
    g = generator
    q = torch.randn(1, h, n, d, generator=g)
    k = torch.randn(1, hkv, nk, d, generator=g)
    v = torch.randn(1, hkv, nk, site.head_dim_v, generator=g)
    half = d // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half // 2 or 1) / max(half // 2, 1))
    pos_k = torch.arange(nk, dtype=torch.float32)[:, None] * freqs
    pos_q = torch.arange(nk - n, nk, dtype=torch.float32)[:, None] * freqs
    enc_k = torch.cat([pos_k.sin(), pos_k.cos()], dim=-1)
    enc_q = torch.cat([pos_q.sin(), pos_q.cos()], dim=-1)
    width = enc_k.shape[-1]
    q[..., :width] += 2.0 * locality * enc_q
    k[..., :width] += 2.0 * locality * enc_k
    sink = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * d**0.5
    q += 0.3 * sink
    k[..., 0, :] += 1.5 * sink
    return q, k, v


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: int | None = None,
    sink_tokens: int = 4,
    distance_bins: int = 16,
) -> dict[str, torch.Tensor]:
    """``sink_mass``, ``distance_mass``, ``entropy`` and ``head_similarity`` of one sample."""
    k = repeat_kv_heads(k, q.shape[1])
    scores = (q[0].float() @ k[0].float().transpose(-1, -2)) * scale
    n, nk = scores.shape[-2:]
    allowed = combined_allowed(n, nk, causal=causal, window=window, device=scores.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    sink_mass = p[..., :sink_tokens].sum(-1).mean(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)
    dist = (torch.arange(n)[:, None] + (nk - n) - torch.arange(nk)[None, :]).clamp_min(0)
    bins = torch.floor(torch.log2(dist.float() + 1)).long().clamp_max(distance_bins - 1)
    distance_mass = torch.zeros(p.shape[0], distance_bins)
    if causal or window:
        distance_mass.index_add_(1, bins.flatten(), p.reshape(p.shape[0], -1))
        distance_mass /= n
    unit = torch.nn.functional.normalize(p, dim=-1)
    head_similarity = torch.einsum("hnk,gnk->hg", unit, unit) / n
    return {
        "sink_mass": sink_mass,
        "distance_mass": distance_mass,
        "entropy": entropy,
        "head_similarity": head_similarity,
    }


def make_stats(
    site: AttentionSite,
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    *,
    num_samples: int = 2,
    seed: int = 0,
) -> SiteStats:
    """A :class:`SiteStats` for ``site`` from given ``(q, k, v)`` samples or structured random ones."""
    if samples is None:
        g = torch.Generator().manual_seed(seed)
        samples = [structured_qkv(site, generator=g) for _ in range(num_samples)]
    if not samples:
        raise ValueError(
            "Expected at least one (q, k, v) sample, but got none. Pass samples or num_samples >= 1."
        )
    stats = SiteStats(site=site.name, scale=site.scale, causal=site.causal, window=site.window)
    parts: dict[str, list[torch.Tensor]] = {}
    for q, k, v in samples:
        stats.q.append(q.float().cpu())
        stats.k.append(k.float().cpu())
        stats.v.append(v.float().cpu())
        stats.attn_mask.append(None)
        stats.record_length(q.shape[-2], k.shape[-2])
        one = attention_statistics(q, k, scale=site.scale, causal=site.causal, window=site.window)
        for key, value in one.items():
            parts.setdefault(key, []).append(value)
    for key, values in parts.items():
        setattr(stats, key, torch.stack(values).mean(0))
    stats.num_calls = len(samples)
    return stats
