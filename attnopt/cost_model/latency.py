"""Seconds per site call: predicted from a roofline, or measured on the real operator.

Prediction is a pure function of (site, candidate, profile, shape):

    t = max(flops / (rate[dtype] * efficiency[kernel]) + scores * score_time[kernel], bytes / bandwidth)
        + launch_overhead + overhead[kernel]

with FLOPs, bytes and softmax scores from the candidate's sympy
:class:`~attnopt.replacements.base.CostFormula` evaluated at the site's shape, and ``kernel``
the family's ``profile_key`` for the candidate's config. Measurement times ``torch.ops.attnopt.<family>`` itself (for
``head_pruned``: the exact operator on the kept heads), warm-up then median, and caches the
result per (site, config, shape, device); :func:`measure_relative` times a candidate in
interleaved pairs with exact attention, which is what planning uses to rank a site's candidates.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from attnopt.codegen.memo import BoundedCache
from attnopt.cost_model._timing import median_time, paired_ratio
from attnopt.cost_model.device_profile import DeviceProfile
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import FAMILIES, Candidate, CostFormula, rewrites_weights

__all__ = [
    "causal_work_factor",
    "clear_latency_cache",
    "dtype_bytes",
    "kept_heads",
    "measure_latency",
    "measure_relative",
    "op_config",
    "predict_latency",
    "profile_key",
    "site_shape",
]

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``"float32"`` or ``"torch.float32"``); unknown: 4."""
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def site_shape(site: AttentionSite, **overrides: int) -> dict[str, int]:
    """The values of :data:`~attnopt.replacements.base.SYMBOLS` at the site's example call.

    ``overrides`` replace single symbols, e.g. ``site_shape(site, Nq=8192, Nk=8192)``.
    """
    shape = dict(
        B=site.batch,
        H=site.num_heads,
        Hkv=site.num_kv_heads,
        Nq=site.q_len,
        Nk=site.kv_len,
        D=site.head_dim,
        Dv=site.head_dim_v,
        E=dtype_bytes(site.dtype),
    )
    unknown = set(overrides) - set(shape)
    if unknown:
        raise ValueError(f"Expected shape symbols from {sorted(shape)}, but got {sorted(unknown)}.")
    shape.update(overrides)
    return shape


def _cost_of(site: AttentionSite, candidate: Candidate) -> CostFormula:
    if candidate.cost is not None:
        return candidate.cost
    from attnopt.replacements.base import get_family

    return get_family(candidate.family).cost(site, candidate.config)


def predict_latency(
    site: AttentionSite,
    candidate: Candidate,
    profile: DeviceProfile,
    shape: dict[str, int] | None = None,
) -> float:
    """Predicted seconds of one call of ``candidate`` at ``shape`` (default: the site's own).

    Example:
        >>> from attnopt.cost_model import SEED_PROFILES, make_site
        >>> from attnopt.replacements.exact import ExactFamily
        >>> site = make_site(heads=32, seq=8192, head_dim=128, dtype="bfloat16")
        >>> cand = ExactFamily().candidates(site, None)[0]
        >>> round(predict_latency(site, cand, SEED_PROFILES["h100"]) * 1e3, 2)  # ANCHORS cuDNN: 0.998 ms
        0.93
    """
    shape = shape or site_shape(site)
    cost = _cost_of(site, candidate)
    flops, nbytes = cost.evaluate(**shape)
    scores = cost.score_count(**shape)
    key = profile_key(candidate)
    tile = profile.family_causal_tile(key)
    if tile and site.causal and not site.window:
        work = causal_work_factor(int(shape["Nq"]), int(shape["Nk"]), tile)
        flops, scores = flops * work, scores * work
    compute = flops / (profile.rate(site.dtype) * profile.family_efficiency(key))
    compute += scores * profile.family_score_s(key)
    memory = nbytes / (profile.memory_gbps * 1.0e9)
    return max(compute, memory) + profile.family_overhead_s(key)


def profile_key(candidate: Candidate) -> str:
    """The device-profile entry that predicts ``candidate``'s kernel (``Family.profile_key``)."""
    from attnopt.replacements.base import get_family

    config = candidate.config
    if isinstance(config, dict):
        config = get_family(candidate.family).config_type.from_json(config)
    return get_family(candidate.family).profile_key(config)


def causal_work_factor(q_len: int, kv_len: int, tile: int) -> float:
    """How much more than half the score matrix a causal kernel computes when it skips work by tiles.

    Kernels skip masked work a ``tile x tile`` block at a time, so at lengths of a few tiles a
    causal call costs nearly as much as a full one (PyTorch's CPU flash kernel: the same time
    for causal and full at N <= 512). Returns ``computed share / 0.5``, the factor on a cost
    formula that counted half of the scores (``dense_cost``); 1 for long sequences.
    """
    if tile <= 0 or q_len <= 0 or kv_len <= 0:
        return 1.0
    offset = kv_len - q_len
    computed = 0
    for start in range(0, q_len, tile):
        last_row = min(start + tile, q_len) - 1
        visible = min(kv_len, last_row + offset + 1)
        computed += (min(start + tile, q_len) - start) * min(kv_len, -(-visible // tile) * tile)
    return (computed / (q_len * kv_len)) / 0.5


def op_config(site: AttentionSite, candidate: Candidate) -> str:
    """The ``config`` string the operator of ``candidate`` receives at ``site``."""
    return json.dumps(
        {
            "site": site.name,
            "family": candidate.family,
            "config": candidate.config.to_json(),
            "mask_static": site.mask_static,
            "window": site.window,
        },
        sort_keys=True,
    )


def kept_heads(candidate: Candidate, num_heads: int) -> int:
    """Query heads a ``head_pruned`` candidate keeps.

    Read from the config's first field that names heads (``kept_heads``/``keep`` as a tuple of
    indices, or ``num_kept_heads``/``num_heads`` as a count); all heads when none does.
    """
    for name, value in sorted(vars(candidate.config).items()):
        if not re.search(r"head|keep|kept", name):
            continue
        if isinstance(value, (tuple, list)):
            return max(len(value), 1)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= num_heads:
            return value
    return num_heads


#: Measured seconds by (operator config, shapes, dtype, device, masked): one float each.
_CACHE: BoundedCache[tuple[Any, ...], float] = BoundedCache("latency.measurements", 16384)


def clear_latency_cache() -> None:
    """Forget every cached measurement (e.g. after the machine's load changed)."""
    _CACHE.clear()


def _runner(site: AttentionSite, candidate: Candidate, q, k, v, attn_mask) -> tuple[Any, tuple[Any, ...]]:
    """(a call of ``candidate``'s operator on these tensors, its cache key)."""
    from attnopt.codegen.ops import op_for

    family = candidate.family
    params = list(candidate.params)
    cfg = op_config(site, candidate)
    if rewrites_weights(family):  # the rewritten model runs exact attention, smaller
        q, k, v = FAMILIES[family].applied_inputs(candidate, q, k, v)
        family, params = "exact", []
        cfg = json.dumps({**json.loads(cfg), "family": "exact", "config": {}}, sort_keys=True)
    key = (
        cfg,
        tuple(q.shape),
        tuple(k.shape),
        tuple(v.shape),
        str(q.dtype),
        str(q.device),
        attn_mask is None,
    )
    op = op_for(family)
    return (lambda: op(q, k, v, attn_mask, params, site.scale, site.causal, cfg)), key


def measure_latency(
    site: AttentionSite,
    candidate: Candidate,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    cache: bool = True,
) -> float:
    """Median seconds of the real operator on ``q``/``k``/``v`` (layout ``(B, H, N, D)``).

    Raises:
        NotImplementedError: when the family has no kernel for the tensors' device.
    """
    run, key = _runner(site, candidate, q, k, v, attn_mask)
    return _cached(key, cache, lambda: median_time(run, device=q.device, warmup=warmup, repeats=repeats))


def _cached(key: tuple[Any, ...], cache: bool, measure) -> float:
    """``_CACHE[key]``, measured by ``measure()`` and stored on a miss (or every time without ``cache``)."""
    value = _CACHE.get(key) if cache else None
    if value is not None:
        return value
    value = measure()
    if cache:
        _CACHE[key] = value
    return value


def measure_relative(
    site: AttentionSite,
    candidate: Candidate,
    reference: Candidate,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    give_up_above: float | None = 1.5,
    cache: bool = True,
) -> float:
    """Seconds of ``candidate`` relative to ``reference`` (usually exact) on the same tensors.

    Runs the two operators in interleaved pairs and returns the median per-pair ratio (see
    :func:`~attnopt.cost_model._timing.paired_ratio`): ranking candidates of one site by this
    survives a shared machine's load changing during planning, which separate medians do not.
    A candidate more than ``give_up_above`` times slower than the reference after one pair is
    not timed further.

    Raises:
        NotImplementedError: when either family has no kernel for the tensors' device.
    """
    run, key = _runner(site, candidate, q, k, v, attn_mask)
    run_ref, ref_key = _runner(site, reference, q, k, v, attn_mask)
    key = ("relative", key, ref_key)
    return _cached(
        key,
        cache,
        lambda: paired_ratio(
            run, run_ref, device=q.device, warmup=warmup, repeats=repeats, give_up_above=give_up_above
        ),
    )
