"""One timer for every measurement the cost model makes: warm-up, then the median of repeats.

The median, not the mean, because a 2-core CI machine is shared and a single preempted run
would otherwise move the number by tens of percent.

``ATTNOPT_CLOCK=thread`` switches CPU timings to the calling thread's CPU time, which ignores
time spent waiting for a core on a shared, oversubscribed machine. It is only meaningful with
one torch thread (ATen then runs every op on the calling thread), so it is refused otherwise.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["clock", "median_time", "paired_ratio", "synchronize"]


def clock(device: torch.device | str | None = None):
    """The clock function to time with: wall clock, or thread CPU time (see the module docstring)."""
    kind = os.environ.get("ATTNOPT_CLOCK", "wall")
    if kind not in ("wall", "thread"):
        raise ValueError(f"Expected ATTNOPT_CLOCK to be 'wall' or 'thread', but got {kind!r}.")
    if kind == "wall":
        return time.perf_counter
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu" or torch.get_num_threads() != 1:
        raise ValueError(
            f"Expected one torch thread on a CPU for ATTNOPT_CLOCK=thread, but got device={dev.type}, "
            f"threads={torch.get_num_threads()}. Call torch.set_num_threads(1) or unset ATTNOPT_CLOCK."
        )
    return time.thread_time


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so wall-clock time covers it (no-op on the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: float | None = None,
) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    ``max_seconds`` stops repeating early (keeping at least one run) once the runs so far took
    that long, so a slow shape cannot blow a profiling budget.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"Expected repeats >= 1 and warmup >= 0, but got repeats={repeats}, warmup={warmup}."
        )
    now = clock(device)
    with torch.no_grad():  # not inference_mode: kernels may cache tensors that later calls update
        for _ in range(warmup):
            fn()
        synchronize(device)
        times: list[float] = []
        start_all = time.perf_counter()
        for _ in range(repeats):
            t0 = now()
            fn()
            synchronize(device)
            times.append(now() - t0)
            if max_seconds is not None and time.perf_counter() - start_all > max_seconds:
                break
    return statistics.median(times)


def paired_ratio(
    fn: Callable[[], object],
    baseline: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
    repeats: int = 5,
    give_up_above: float | None = None,
) -> float:
    """Median over interleaved pairs of ``time(fn) / time(baseline)``.

    Timing the two back to back, pair after pair, cancels what a shared machine adds to both
    (another process taking a core for a second, frequency changes), which separate medians
    taken minutes apart do not: measured on the 2-core CI machine, separate medians of the same
    kernels moved ±40% between planning and benchmarking, paired ratios a few percent.
    ``give_up_above`` stops after the first pair when ``fn`` is already that many times slower
    (a candidate that slow is never chosen, and timing it again would only cost time).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"Expected repeats >= 1 and warmup >= 0, but got repeats={repeats}, warmup={warmup}."
        )
    now = clock(device)
    with torch.no_grad():
        for _ in range(warmup):
            baseline()
            fn()
        synchronize(device)
        ratios: list[float] = []
        for _ in range(repeats):
            t0 = now()
            baseline()
            synchronize(device)
            t1 = now()
            fn()
            synchronize(device)
            t2 = now()
            ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
            if give_up_above is not None and ratios[-1] > give_up_above:
                break
    return statistics.median(ratios)
