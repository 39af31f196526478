"""Measure a :class:`~attnopt.cost_model.device.DeviceProfile` on the device at hand.

What is measured, and why each number:

* matmul rate per dtype (square matmuls large enough to be near peak): the roofline's compute roof;
* memory bandwidth (a large copy, read + write): the roofline's memory roof;
* launch overhead (the exact operator on a tiny input): the fixed cost of any call;
* per kernel (``Family.profile_key``: a family, or one of its kernels), its efficiency, fixed
  cost and time per softmax score: each registered kernel is timed through
  ``torch.ops.attnopt.<family>`` at a few shapes (head dims 32, 64 and 128) and
  ``t = overhead + flops / (rate * eff) + scores * score_time`` is fitted in relative least
  squares (``overhead + flops/x`` is Hockney's ``n_1/2`` model, which is what makes small shapes
  predictable on a CPU whose kernels only saturate late; the score term is the softmax and
  masking work that does not grow with the head dim, which a FLOP rate alone fitted at
  ``D=64`` over-charges at ``D=128``).

The whole measurement takes well under 20 s on a 2-core CPU and is cached (see
:func:`attnopt.cost_model.device.get_profile`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import NamedTuple

import torch

from attnopt._steps import timed
from attnopt.codegen import load_kernels  # re-exported: the one kernel loader
from attnopt.codegen.memo import BoundedCache
from attnopt.cost_model._timing import median_time, synchronize
from attnopt.cost_model.device_profile import (
    DeviceProfile,
    _resolve_device,
    load_cached_profile,
    local_device_name,
    save_profile,
    versions,
)

__all__ = [
    "CAUSAL_TILES",
    "Timing",
    "fit_family",
    "fit_latency_terms",
    "load_kernels",
    "measure_family",
    "profile_device",
]

log = logging.getLogger(__name__)

#: (device name, family) whose profiling failed in this process: not retried until restart, so
#: planning does not pay for a broken kernel on every call (the family plans at exact's speed).
_FAILED: BoundedCache[tuple[str, str], bool] = BoundedCache("profiling.failed", 1024)

#: (heads, seq, head_dim, causal) shapes each family is timed at on a CPU / on a GPU, most
#: informative first (a slow family may stop early, see ``time_budget_s``).
CPU_SHAPES = (
    (4, 256, 64, True),
    (4, 1024, 64, True),
    (2, 512, 128, False),
    (8, 512, 32, True),
    (4, 512, 64, False),
    (4, 512, 64, True),
    (4, 2048, 64, True),
    (4, 1024, 64, False),
)
#: Length of the synthetic site families fit their candidates on while profiling.
FIT_SEQ = 128

GPU_SHAPES = ((16, 1024, 128, True), (16, 2048, 128, True), (16, 4096, 128, True), (16, 2048, 128, False))


def _matmul_rates(dev: torch.device) -> dict[str, float]:
    n = 1024 if dev.type == "cpu" else 4096
    dtypes = [torch.float32] if dev.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    rates: dict[str, float] = {}
    for dt in dtypes:
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        t = median_time(lambda: a @ b, device=dev, warmup=1, repeats=3)  # noqa: B023
        rates[str(dt).removeprefix("torch.")] = 2 * n**3 / t / 1e12
    if dev.type == "cuda":
        try:  # INT8 tensor cores, as the quantized family uses them
            a8 = torch.randint(-8, 8, (n, n), device=dev, dtype=torch.int8)
            t = median_time(lambda: torch._int_mm(a8, a8), device=dev, warmup=1, repeats=3)
            rates["int8"] = 2 * n**3 / t / 1e12
        except (RuntimeError, AttributeError) as e:  # pragma: no cover - depends on the GPU
            log.debug("int8 matmul not measured: %s", e)
    return rates


def _memory_gbps(dev: torch.device) -> float:
    numel = (64 if dev.type == "cpu" else 512) * 2**20 // 4
    x = torch.empty(numel, device=dev)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device=dev, warmup=1, repeats=5)
    return 2 * numel * 4 / t / 1e9


#: Bounds on a fitted efficiency (relative to the measured matmul rate): outside them a fit
#: reflects disturbed timings, not the kernel.
MIN_EFFICIENCY, MAX_EFFICIENCY = 0.02, 4.0


class Timing(NamedTuple):
    """One timed call: the candidate's stated FLOPs, the median seconds, and the shape facts.

    ``scores`` is the cost formula's softmax score count and ``key`` the profile entry the
    timing belongs to (``Family.profile_key``; empty: the family's own).
    """

    flops: float
    seconds: float
    q_len: int
    kv_len: int
    causal: bool
    scores: float = 0.0
    key: str = ""


def fit_latency_terms(
    flops: list[float], scores: list[float], seconds: list[float], rate: float
) -> tuple[float, float, float, float]:
    """Fit ``seconds = overhead + flops / (rate * eff) + scores * score_s`` in relative least squares.

    Every subset of the terms that keeps the FLOP term is solved; a subset whose coefficients
    come out negative is physically meaningless and skipped, and of the rest the one with the
    least relative RMS residual wins, a term being kept only when it lowers the residual by
    more than 5% of itself (a third coefficient fitted to noise would mislead every other
    shape). Returns ``(overhead_s >= 0, eff > 0, score_s >= 0, relative_rms)``.
    """
    if not (len(flops) == len(scores) == len(seconds)) or not flops:
        raise ValueError(
            f"Expected equal, non-empty lists, but got {len(flops)} flops, {len(scores)} scores and "
            f"{len(seconds)} times."
        )
    t = torch.tensor(seconds, dtype=torch.float64)
    columns = {
        "overhead": torch.ones_like(t),
        "flops": torch.tensor(flops, dtype=torch.float64),
        "scores": torch.tensor(scores, dtype=torch.float64),
    }
    best: tuple[float, dict[str, float]] | None = None
    for names in (("flops",), ("overhead", "flops"), ("flops", "scores"), ("overhead", "flops", "scores")):
        if len(names) > len(flops) or ("scores" in names and not columns["scores"].any()):
            continue
        design = torch.stack([columns[n] / t for n in names], dim=1)
        coef = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution.flatten().tolist()
        fit = dict(zip(names, coef))
        if fit["flops"] <= 0 or any(v < 0 for v in fit.values()):
            continue
        # an overhead this far outside physics means disturbed timings (a loaded machine)
        if fit.get("overhead", 0.0) > 0.5 * float(t.min()):
            continue
        rms = float((((design @ torch.tensor(coef, dtype=torch.float64)) - 1.0) ** 2).mean().sqrt())
        if best is None or rms < 0.95 * best[0]:
            best = (rms, fit)
    if best is None:  # nothing physical: the plain ratio fit
        x = columns["flops"]
        best = (math.nan, {"flops": float((x / t).sum() / (x / t).pow(2).sum())})
    rms, fit = best
    eff = min(max(1.0 / (fit["flops"] * rate), MIN_EFFICIENCY), MAX_EFFICIENCY)
    return fit.get("overhead", 0.0), eff, fit.get("scores", 0.0), rms


#: Tile sizes tried when fitting how a kernel skips causal work (0 = as its formula says).
CAUSAL_TILES = (0, 32, 64, 128, 256, 512, 1024)


def fit_family(points: list[Timing], rate: float) -> tuple[float, float, int, float, float]:
    """Fit overhead, efficiency, causal tile and time per score of one kernel's timings.

    Every tile in :data:`CAUSAL_TILES` is tried (flops and scores of causal points scaled by
    :func:`~attnopt.cost_model.latency.causal_work_factor`), each with
    :func:`fit_latency_terms`, and the one with the least relative RMS residual wins.
    Returns ``(overhead_s, eff, tile, relative_rms, score_s)``.
    """
    from attnopt.cost_model.latency import causal_work_factor

    if not points:
        raise ValueError("Expected at least one timing to fit, but got none.")
    best: tuple[float, float, int, float, float] | None = None
    tiles = CAUSAL_TILES if any(p.causal for p in points) else (0,)
    seconds = [p.seconds for p in points]
    for tile in tiles:
        work = [causal_work_factor(p.q_len, p.kv_len, tile) if p.causal else 1.0 for p in points]
        flops = [p.flops * w for p, w in zip(points, work)]
        scores = [p.scores * w for p, w in zip(points, work)]
        overhead, eff, score_s, _ = fit_latency_terms(flops, scores, seconds, rate)
        pred = [overhead + f / (rate * eff) + s * score_s for f, s in zip(flops, scores)]
        rms = (sum(((a - b) / b) ** 2 for a, b in zip(pred, seconds)) / len(seconds)) ** 0.5
        if best is None or rms < best[3] - 1e-3:
            best = (overhead, eff, tile, rms, score_s)
    return best


def _config_string(site_name: str, family: str, config_json: dict, window: int | None) -> str:
    import json

    return json.dumps(
        {"site": site_name, "family": family, "config": config_json, "mask_static": True, "window": window},
        sort_keys=True,
    )


def _fit_candidates(fam, heads: int, d: int, causal: bool, max_candidates: int) -> list:
    """Candidates fitted on a short synthetic site; their configs/params are reused at other lengths.

    The first candidate of each kernel (``fam.profile_key``) comes first, so a family with
    several kernels has each of them timed before a second config of any.
    """
    from attnopt.cost_model.synthetic import make_site, make_stats

    site = make_site(f"profile.{fam.name}#0", heads=heads, seq=FIT_SEQ, head_dim=d, causal=causal)
    stats = None if fam.name == "exact" else make_stats(site, num_samples=1)
    cheap = getattr(fam, "profile_candidates", None)  # optional hook: unfitted params, same shapes
    cands = list(cheap(site, stats)) if cheap is not None else fam.candidates(site, stats)
    firsts: dict[str, object] = {}
    for cand in cands:
        firsts.setdefault(fam.profile_key(cand.config), cand)
    rest = [c for c in cands if all(c is not f for f in firsts.values())]
    return (list(firsts.values()) + rest)[:max_candidates]


def measure_family(
    family: str,
    dev: torch.device,
    shapes=None,
    *,
    repeats: int = 5,
    max_candidates: int = 2,
    time_budget_s: float = 6.0,
) -> list[Timing]:
    """:class:`Timing` records of ``family``'s kernel on ``dev`` at ``shapes``.

    Candidates come from the family itself, fitted once on a short synthetic structured site
    (fitting can take seconds: the linear family trains feature maps) and reused at the other
    lengths; where a reused candidate does not run at a length (a layout fitted per length),
    the family is asked again at that length. FLOPs come from ``family.cost`` at each shape.
    A family may offer ``profile_candidates(site, stats)`` returning unfitted candidates of the
    same shapes, which profiling then uses instead of fitting. Returns an empty list when the family proposes nothing.
    """
    from attnopt.codegen.ops import op_for
    from attnopt.cost_model.synthetic import make_site, make_stats, structured_qkv
    from attnopt.replacements.base import get_family

    shapes = shapes or (CPU_SHAPES if dev.type == "cpu" else GPU_SHAPES)
    fam = get_family(family)
    op = op_for(family)
    points: list[Timing] = []
    fitted: dict[tuple[int, int, bool], list] = {}
    start = time.perf_counter()
    for heads, seq, d, causal in shapes:
        if len(points) >= 3 and time.perf_counter() - start > time_budget_s:
            break
        site = make_site(f"profile.{family}#0", heads=heads, seq=seq, head_dim=d, causal=causal)
        key = (heads, d, causal)
        if key not in fitted:
            fitted[key] = _fit_candidates(fam, heads, d, causal, max_candidates)
        q, k, v = (x.to(dev) for x in structured_qkv(site, generator=torch.Generator().manual_seed(1)))
        shape = dict(B=1, H=heads, Hkv=heads, Nq=seq, Nk=seq, D=d, Dv=d, E=4)
        for cand in fitted[key]:
            cfg = _config_string(site.name, family, cand.config.to_json(), site.window)
            params = [p.to(dev) for p in cand.params]

            def call(cfg=cfg, params=params):
                return op(q, k, v, None, params, site.scale, site.causal, cfg)  # noqa: B023

            try:
                call()
            except Exception:  # noqa: BLE001  (fitted for another length: fit again at this one)
                stats = make_stats(site, num_samples=1)
                refit = [c for c in fam.candidates(site, stats) if c.config == cand.config] or [cand]
                cand = refit[0]
                params = [p.to(dev) for p in cand.params]

                def call(cfg=cfg, params=params):
                    return op(q, k, v, None, params, site.scale, site.causal, cfg)  # noqa: B023

            cost = fam.cost(site, cand.config)
            flops, _ = cost.evaluate(**shape)
            t = median_time(call, device=dev, warmup=1, repeats=repeats, max_seconds=2.0)
            points.append(
                Timing(flops, t, seq, seq, causal, cost.score_count(**shape), fam.profile_key(cand.config))
            )
    return points


def _launch_overhead_us(dev: torch.device) -> float:
    from attnopt.codegen.ops import op_for

    op = op_for("exact")
    q = torch.randn(1, 1, 8, 16, device=dev)
    cfg = _config_string("profile.launch#0", "exact", {}, None)
    return (
        median_time(lambda: op(q, q, q, None, [], 0.25, False, cfg), device=dev, warmup=3, repeats=21) * 1e6
    )


def _kernel_families(dev: torch.device) -> list[str]:
    """Families whose operator has a kernel on ``dev``: what a profile measures.

    Weight rewrites (head pruning) have no operator of their own: their sites run the exact
    operator on fewer heads, which the exact fit already predicts, so they are not profiled
    (their registered kernel only emulates the rewrite for planning).
    """
    from attnopt.codegen.ops import FAMILY_OPS, KERNELS

    load_kernels(dev.type)
    fams = {fam for fam, dt in KERNELS if dt in (dev.type, "any") and fam in FAMILY_OPS}
    return ["exact"] + sorted(fams - {"exact"})


def _measured(profile: DeviceProfile, family: str) -> bool:
    """Whether ``profile`` holds a fit for ``family`` or for one of its kernels."""
    return any(key.split(":", 1)[0] == family for key in profile.efficiency)


def profile_device(
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    refresh: bool = False,
    families: list[str] | None = None,
) -> DeviceProfile:
    """Measure (or load from cache) the profile of ``device``.

    A cached profile is reused when it was measured for this device name and the running
    torch/triton versions; families whose kernels were registered since are measured and added.

    Args:
        device: ``None`` = the first GPU if any, else the CPU.
        cache_dir: cache directory (default ``$ATTNOPT_CACHE`` or ``~/.cache/attnopt``).
        refresh: measure everything again even if cached.
        families: families to measure (default: every family with a kernel for the device).

    Returns:
        The measured :class:`DeviceProfile`, also written to the cache.
    """
    dev = _resolve_device(device)
    name = local_device_name(dev)
    wanted = families or _kernel_families(dev)
    profile = None if refresh else load_cached_profile(name, cache_dir)
    if profile is not None and all(_measured(profile, f) or (name, f) in _FAILED for f in wanted):
        return profile
    took: dict[str, float] = {}
    with timed(took, "profile"):
        profile = _measure_profile(profile, dev, name, wanted)
    profile.source = f"measured by attnopt.cost_model.profile_device in {took['profile']:.1f} s"
    save_profile(profile, cache_dir)
    return profile


def _measure_profile(
    profile: DeviceProfile | None, dev: torch.device, name: str, wanted: list[str]
) -> DeviceProfile:
    """``profile`` (a cached one, or None for a new one) with every ``wanted`` family measured on ``dev``."""
    if profile is None:
        profile = DeviceProfile(
            name=name,
            device_type=dev.type,
            matmul_tflops=_matmul_rates(dev),
            memory_gbps=_memory_gbps(dev),
            launch_overhead_us=_launch_overhead_us(dev),
            source="measured by attnopt.cost_model.profile_device",
            versions=versions(),
            target="local",
        )
    rate = profile.rate("float32")
    for family in wanted:
        if _measured(profile, family) or (name, family) in _FAILED:
            continue
        try:
            points = measure_family(family, dev)
        except Exception as e:  # a family still being written must not break profiling  # noqa: BLE001
            log.warning("attnopt: could not profile family %r on %s: %s", family, name, e)
            _FAILED.add((name, family))
            continue
        by_key: dict[str, list[Timing]] = {}
        for p in points:
            by_key.setdefault(p.key or family, []).append(p)
        for key, group in by_key.items():
            overhead, eff, tile, rms, score_s = fit_family(group, rate)
            log.info(
                "attnopt: profiled %s on %s: eff=%.3g tile=%d score=%.3gns rms=%.2f",
                key, name, eff, tile, score_s * 1e9, rms,
            )  # fmt: skip
            profile.efficiency[key] = round(min(max(eff, 1e-4), 4.0), 6)
            profile.overhead_us[key] = round(max(overhead * 1e6 - profile.launch_overhead_us, 0.0), 3)
            if tile:
                profile.causal_tile[key] = tile
            if score_s > 0:
                profile.score_ns[key] = round(score_s * 1e9, 6)
    synchronize(dev)
    return profile
