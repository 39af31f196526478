"""How far a candidate's site output lands from exact attention, on calibration samples.

Measured, never assumed: every kept calibration sequence of the site is run through the
candidate (its registered CPU kernel through ``torch.ops.attnopt.<family>``, or the family's
plain ``reference`` where no kernel exists yet, e.g. ``head_pruned``) and compared with
:func:`~attnopt.replacements.exact.attention_reference` computed in float64.

Two numbers per (site, candidate), pooled over all samples (so long sequences weigh more):

* relative L2 error ``sqrt(sum ||out - ref||^2 / sum ||ref||^2)`` — the planner's error;
* cosine similarity of the flattened outputs — the ``"cosine"`` budget metric (``1 - cos``).
"""

from __future__ import annotations

import functools
import math
import threading
import weakref

import torch

from attnopt.codegen.memo import BoundedCache
from attnopt.cost_model.latency import op_config
from attnopt.patterns.masks import combined_allowed, merge_allowed
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.site_stats import SiteStats
from attnopt.replacements.base import Candidate
from attnopt.replacements.exact import attention_reference

__all__ = ["clear_error_cache", "candidate_output", "measure_candidate_error", "annotate_errors"]

#: Measured ``(error, cosine)`` by (site, config, samples' identity): two floats each.
_CACHE: BoundedCache[tuple[str, str, tuple], tuple[float, float]] = BoundedCache("error.measurements", 16384)

# Float64 references per calibration sample: computed once per site, not once per candidate.
# Keyed by id(q) and held only while q lives (the planning run's calibration samples): the entry
# is dropped when q is freed, so references never outlive the run that made them, and an id
# reused by a new tensor can never match (the weak reference would be dead, or not q).
_REFERENCES: dict[int, tuple[weakref.ref, dict]] = {}
_REFERENCES_LOCK = threading.RLock()  # re-entrant: a weakref callback may fire inside the lock


def _drop_reference(key: int, ref: weakref.ref) -> None:
    with _REFERENCES_LOCK:
        if _REFERENCES.get(key, (None,))[0] is ref:
            del _REFERENCES[key]


def _reference(site: AttentionSite, q, k, v, mask) -> torch.Tensor:
    with _REFERENCES_LOCK:
        held = _REFERENCES.get(id(q))
        if held is None or held[0]() is not q:
            held = _REFERENCES[id(q)] = (weakref.ref(q, functools.partial(_drop_reference, id(q))), {})
    per_q = held[1]
    key = (site.name, site.scale, site.causal, site.window, id(k), id(v), id(mask))
    ref = per_q.get(key)
    if ref is None:
        ref = per_q[key] = attention_reference(
            q.double(), k.double(), v.double(), mask, scale=site.scale, causal=site.causal, window=site.window
        )
    return ref


def _stats_key(stats: SiteStats) -> tuple:
    """A cheap identity of the samples (shapes and a few values), so new samples miss the cache."""
    return tuple(
        (tuple(q.shape), float(q.flatten()[:256].sum()), float(v.flatten()[-256:].sum()))
        for q, v in zip(stats.q, stats.v)
    )


def clear_error_cache() -> None:
    """Forget cached error measurements."""
    _CACHE.clear()
    with _REFERENCES_LOCK:
        _REFERENCES.clear()


def candidate_output(
    site: AttentionSite,
    candidate: Candidate,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The site output ``candidate`` computes on one sample (kernel if registered, else reference)."""
    from attnopt.codegen.ops import FAMILY_OPS, KERNELS, op_for

    family = candidate.family
    has_kernel = (family, q.device.type) in KERNELS or (family, "any") in KERNELS
    if family in FAMILY_OPS and has_kernel:
        op = op_for(family)
        return op(
            q, k, v, attn_mask, list(candidate.params), site.scale, site.causal, op_config(site, candidate)
        )
    from attnopt.replacements.base import get_family

    mask = attn_mask
    if site.window:  # family.reference knows causal but not windows: hand the window over as a mask
        allowed = combined_allowed(q.shape[-2], k.shape[-2], causal=True, window=site.window, device=q.device)
        mask = merge_allowed(mask, allowed)
    return get_family(family).reference(
        q, k, v, candidate, scale=site.scale, causal=site.causal, attn_mask=mask
    )


def _from_exact(candidate: Candidate, exact: torch.Tensor) -> torch.Tensor | None:
    """The candidate's output derived from exact attention's, where its family defines one."""
    from attnopt.replacements.base import get_family

    try:
        return get_family(candidate.family).from_exact(candidate, exact)
    except ValueError:  # not a registered family (tests register ad-hoc ones through kernels)
        return None


def measure_candidate_error(
    site: AttentionSite, candidate: Candidate, stats: SiteStats, *, cache: bool = True
) -> tuple[float, float]:
    """``(relative L2 error, cosine similarity)`` of ``candidate`` against exact attention.

    Raises:
        ValueError: when ``stats`` holds no samples or belongs to another site.
    """
    if not stats.q:
        raise ValueError(
            f"Expected calibration samples for site {site.name}, but got none. Calibrate the model first."
        )
    if stats.site != site.name:
        raise ValueError(f"Expected stats of site {site.name!r}, but got stats of {stats.site!r}.")
    if candidate.family == "exact":
        return 0.0, 1.0
    key = (site.name, candidate.config.key(), _stats_key(stats))
    hit = _CACHE.get(key) if cache else None
    if hit is not None:
        return hit
    err_sq = ref_sq = dot = out_sq = 0.0
    # no_grad, not inference_mode: kernels may cache tensors (layouts) that later calls update
    with torch.no_grad():
        for q, k, v, mask in stats.samples():
            ref = _reference(site, q, k, v, mask)
            out = _from_exact(candidate, ref)
            if out is None:
                out = candidate_output(site, candidate, q, k, v, mask).double()
            if out.shape != ref.shape:
                raise ValueError(
                    f"Expected {candidate.label} at {site.name} to return shape {tuple(ref.shape)}, "
                    f"but got {tuple(out.shape)}. Fix the family's kernel or reference."
                )
            err_sq += float((out - ref).pow(2).sum())
            ref_sq += float(ref.pow(2).sum())
            out_sq += float(out.pow(2).sum())
            dot += float((out * ref).sum())
    rel = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.sqrt(err_sq)
    cos = dot / math.sqrt(out_sq * ref_sq) if out_sq > 0 and ref_sq > 0 else float(out_sq == ref_sq)
    if not math.isfinite(rel):
        rel, cos = math.inf, 0.0
    result = (rel, cos)
    if cache:
        _CACHE[key] = result
    return result


def annotate_errors(
    sites: dict[str, AttentionSite], candidates: dict[str, list[Candidate]], stats: dict[str, SiteStats]
) -> dict[tuple[str, str], tuple[float, float]]:
    """Measure every candidate and write its relative L2 error into ``Candidate.error``.

    Returns ``{(site, config key): (rel_l2, cosine)}`` for reports and the cosine metric.
    """
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for name, cands in candidates.items():
        for cand in cands:
            rel, cos = measure_candidate_error(sites[name], cand, stats[name])
            cand.error = rel
            out[(name, cand.config.key())] = (rel, cos)
    return out
