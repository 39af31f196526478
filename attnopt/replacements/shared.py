"""Shared attention scores (CHAI): heads whose attention maps agree compute them once.

CHAI (Agarwal et al., "CHAI: Clustered Head Attention for Efficient LLM Inference", 2024)
observes that many heads of a layer attend alike. Heads are clustered on calibration data by
the cosine similarity of their attention rows; each cluster keeps one *representative* whose
``softmax(q_r k_r^T * scale)`` is computed once and applied to every member's own values::

    out[:, h] = softmax(q[:, rep(h)] @ k[:, kv(rep(h))]^T * scale + mask) @ v[:, kv(h)]

so a site with ``C`` clusters computes ``C`` score matrices instead of ``H`` (the ``Q K^T`` and
softmax FLOPs drop by ``C / H``), while every head still reads its own values. GQA: ``kv(h)`` is
the key/value head of query head ``h``, so a member's values come from its own group.

Clustering is average-link agglomerative (scipy) on ``1 - similarity``, cut at distance
``1 - threshold``: deterministic, and every pair of heads inside a cluster agrees on average at
least ``threshold``. The representative is the member most similar to the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import sympy
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from attnopt.replacements.base import SYMBOLS, Candidate, CostFormula, Family, FamilyConfig, register_family
from attnopt.replacements.exact import attention_reference, repeat_kv_heads

__all__ = [
    "SHARE_THRESHOLDS",
    "SharedConfig",
    "SharedFamily",
    "attention_similarity",
    "cluster_heads",
    "selection_reuse_plan",
    "shared_params",
]

log = logging.getLogger(__name__)

#: Similarity thresholds tried per site, strictest first; each distinct clustering is a candidate.
SHARE_THRESHOLDS = (0.98, 0.95, 0.9, 0.8)


@dataclass(frozen=True)
class SharedConfig(FamilyConfig):
    """How a site's query heads share attention scores.

    Attributes:
        clusters: the clusters, each an ascending tuple of query-head indices; together they
            partition ``range(num_heads)``, ordered by their smallest head.
        representatives: one head per cluster (a member of it) whose scores the cluster uses.
        threshold: the similarity the clustering was cut at (for reports).
    """

    family: ClassVar[str] = "shared"
    clusters: tuple[tuple[int, ...], ...] = ()
    representatives: tuple[int, ...] = ()
    threshold: float = 0.95

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SharedConfig:
        cfg = super().from_json(d)
        # JSON turns the inner tuples into lists; the base class only converts the outer one.
        return cls(
            clusters=tuple(tuple(int(h) for h in c) for c in cfg.clusters),
            representatives=tuple(int(r) for r in cfg.representatives),
            threshold=float(cfg.threshold),
        )

    def describe(self) -> str:
        return f"clusters={len(self.clusters)} threshold={self.threshold}"


def shared_params(config: SharedConfig, num_heads: int) -> list[torch.Tensor]:
    """The operator's params: ``cluster_of_head`` ``(H,)`` and ``representatives`` ``(C,)``, int64.

    Raises:
        ValueError: the clusters do not partition ``range(num_heads)`` or a representative is
            not a member of its cluster.
    """
    members = sorted(h for c in config.clusters for h in c)
    if members != list(range(num_heads)) or len(config.representatives) != len(config.clusters):
        raise ValueError(
            f"Expected clusters partitioning range({num_heads}) with one representative each, but got "
            f"clusters={config.clusters}, representatives={config.representatives}. Rebuild the config "
            "with cluster_heads."
        )
    cluster_of_head = torch.empty(num_heads, dtype=torch.int64)
    for c, (cluster, rep) in enumerate(zip(config.clusters, config.representatives)):
        if rep not in cluster:
            raise ValueError(
                f"Expected representative {rep} to be a member of its cluster, but got cluster {cluster}. "
                "Pick a representative from the cluster."
            )
        cluster_of_head[list(cluster)] = c
    return [cluster_of_head, torch.tensor(config.representatives, dtype=torch.int64)]


def attention_similarity(stats: Any, query_samples: int = 256, seed: int = 0) -> torch.Tensor:
    """``(H, H)`` mean cosine similarity of the heads' attention rows on calibration samples.

    Uses ``stats.head_similarity`` when calibration filled it; otherwise samples up to
    ``query_samples`` query rows per sequence (the same rows for every head) and compares the
    heads' softmax rows over all keys, so memory stays at ``H x rows x N``.
    """
    if stats.head_similarity is not None:
        return stats.head_similarity.float()
    gen = torch.Generator().manual_seed(seed)
    total, count = None, 0
    for q, k, _, mask in stats.samples():
        nq, _nk = q.shape[-2], k.shape[-2]
        rows = torch.randperm(nq, generator=gen)[: min(query_samples, nq)].sort().values
        probs = _rows_softmax(q.float(), repeat_kv_heads(k.float(), q.shape[1]), rows, mask, stats)
        unit = torch.nn.functional.normalize(probs, dim=-1)  # (H, R, Nk)
        sim = torch.einsum("hrn,grn->hg", unit, unit) / max(rows.numel(), 1)
        total = sim if total is None else total + sim
        count += 1
    if total is None:
        raise ValueError(
            f"Expected calibration samples for site {stats.site}, but got none and no head_similarity. "
            "Calibrate the site before asking for shared candidates."
        )
    return total / count


def _rows_softmax(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, mask: Any, stats: Any
) -> torch.Tensor:
    """Attention rows ``rows`` of every head of one ``(1, H, N, D)`` sample: ``(H, R, Nk)``."""
    nq, nk = q.shape[-2], k.shape[-2]
    scores = (q[0][:, rows] @ k[0].transpose(-1, -2)) * stats.scale
    j = torch.arange(nk)[None, :]
    i = rows[:, None] + (nk - nq)
    allowed = torch.ones(rows.numel(), nk, dtype=torch.bool)
    if stats.causal or stats.window:
        allowed &= j <= i
    if stats.window:
        allowed &= j > i - stats.window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        m = mask.expand(1, q.shape[1], nq, nk)[0][:, rows]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def cluster_heads(
    similarity: torch.Tensor, threshold: float
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Average-link clusters of heads whose similarity is at least ``threshold``, and their representatives.

    Returns:
        ``(clusters, representatives)``: clusters ordered by their smallest head; each
        representative is the member with the highest mean similarity to its cluster (lowest
        index on ties).

    Example:
        >>> sim = torch.tensor([[1.0, 0.99, 0.1], [0.99, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> cluster_heads(sim, 0.9)
        (((0, 1), (2,)), (0, 2))
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"Expected a square (H, H) similarity, but got shape {tuple(similarity.shape)}.")
    heads = similarity.shape[0]
    sim = similarity.double().clamp(0.0, 1.0)
    sim = (sim + sim.T) / 2
    if heads == 1:
        return ((0,),), (0,)
    dist = (1.0 - sim).numpy()
    np.fill_diagonal(dist, 0.0)
    condensed = dist[np.triu_indices(heads, k=1)]
    labels = fcluster(linkage(condensed, method="average"), t=1.0 - threshold + 1e-12, criterion="distance")
    groups: dict[int, list[int]] = {}
    for h, label in enumerate(labels):
        groups.setdefault(int(label), []).append(h)
    clusters = tuple(sorted(tuple(g) for g in groups.values()))
    reps = tuple(max(c, key=lambda h: (float(sim[h, list(c)].mean()), -h)) for c in clusters)
    return clusters, reps


class SharedFamily(Family):
    """CHAI-style score sharing between heads with agreeing attention maps."""

    name = "shared"
    config_type = SharedConfig

    def unsupported_reason(self, site: Any) -> str | None:
        reason = super().unsupported_reason(site)
        if reason:
            return reason
        if site.num_heads < 2:
            return f"site {site.name} has a single query head, so no head can share its scores"
        return None

    def candidates(self, site: Any, stats: Any) -> list[Candidate]:
        if self.unsupported_reason(site):
            return []
        if stats.head_similarity is None and not stats.q:
            log.debug("shared: site %s has no calibration samples to cluster heads on", site.name)
            return []
        sim = attention_similarity(stats)
        out: list[Candidate] = []
        seen: set[tuple[tuple[int, ...], ...]] = set()
        for threshold in SHARE_THRESHOLDS:
            clusters, reps = cluster_heads(sim, threshold)
            if len(clusters) == site.num_heads or clusters in seen:
                continue  # all singletons is exact attention at a higher price
            seen.add(clusters)
            config = SharedConfig(clusters=clusters, representatives=reps, threshold=threshold)
            note = f"{len(clusters)} score computations for {site.num_heads} heads"
            params = shared_params(config, site.num_heads)
            out.append(Candidate(site.name, self.name, config, params, self.cost(site, config), notes=note))
        return out

    def reference(self, q, k, v, candidate, *, scale, causal, attn_mask=None, window=None):  # noqa: ANN001
        """Each head attends with its representative's q/k (and mask) over its own values."""
        cluster_of_head, reps = candidate.params[0], candidate.params[1]
        rep_of_head = reps[cluster_of_head].to(q.device)
        k_full = repeat_kv_heads(k, q.shape[1])
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] > 1:
            attn_mask = attn_mask[:, rep_of_head]
        return attention_reference(
            q[:, rep_of_head], k_full[:, rep_of_head], v, attn_mask, scale=scale, causal=causal, window=window
        )

    def cost(self, site: Any, config: FamilyConfig) -> CostFormula:
        """Scores and softmax for the ``C`` representatives, ``P @ V`` for all ``H`` heads."""
        s = SYMBOLS
        share = sympy.Rational(len(config.clusters), site.num_heads)
        pairs = s["B"] * s["Nq"] * s["Nk"]
        if site.window:
            pairs = pairs * sympy.Min(site.window, s["Nk"]) / s["Nk"]
        elif site.causal:
            pairs = pairs / 2
        flops = pairs * (s["H"] * share * (2 * s["D"] + 5) + s["H"] * 2 * s["Dv"])
        nbytes = (
            s["E"]
            * s["B"]
            * (
                s["H"] * share * s["Nq"] * s["D"]
                + s["H"] * s["Nq"] * s["Dv"]
                + s["Hkv"] * s["Nk"] * (s["D"] + s["Dv"])
            )
        )
        return CostFormula(flops=flops, bytes=nbytes, scores=pairs * s["H"] * share)


register_family(SharedFamily())


# --- cross-layer reuse of block selections --------------------------------------------------


def selection_reuse_plan(
    block_maps: dict[str, torch.Tensor], *, min_recall: float = 0.9, min_precision: float = 0.5
) -> dict[str, str]:
    """Which sites may reuse an earlier site's block-sparse selection instead of selecting their own.

    Neighbouring layers often pick nearly the same key blocks. A *follower* may reuse a *leader*
    (an earlier site that selects for itself) when the leader's selection covers at least
    ``min_recall`` of the follower's selected blocks and at least ``min_precision`` of the
    leader's blocks are ones the follower wants (so reuse does not compute much extra). Each
    follower takes the nearest such leader, so the selection pass runs once per leader.

    Args:
        block_maps: ``{site_name: bool (B, H, Mq, Mk)}`` block selections on the same calibration
            input (e.g. ``BlockLayout.block_map()``), in execution order; sites whose shapes
            differ never share.

    Returns:
        ``{follower: leader}``; sites absent from it select for themselves.

    Example:
        >>> a = torch.tensor([[[[True, False], [True, True]]]])
        >>> selection_reuse_plan({"l0": a, "l1": a.clone(), "l2": ~a})
        {'l1': 'l0'}
    """
    leaders: list[str] = []
    plan: dict[str, str] = {}
    for name, sel in block_maps.items():
        sel = sel.bool()
        for leader in reversed(leaders):
            lead = block_maps[leader].bool()
            if lead.shape != sel.shape:
                continue
            both = float((lead & sel).sum())
            recall = both / max(float(sel.sum()), 1.0)
            precision = both / max(float(lead.sum()), 1.0)
            if recall >= min_recall and precision >= min_precision:
                plan[name] = leader
                break
        else:
            leaders.append(name)
    return plan
