"""``attnopt.optimize(model, budget)`` without ``calib=``: plan on the model's first calls.

As ``torch.compile`` compiles on first use, an optimised model with no calibration data runs
its first :data:`DEFAULT_CALLS` calls unchanged while recording them, then plans on them
(calibration, candidates, timing, end-to-end validation: the same pipeline as ``calib=``) inside
the call that completes the set, and installs the plan: later calls run it. Planning failing for
any reason leaves the model exactly as it was, with a warning naming the cause; it is never left
half-rewritten.

Calls that continue a KV cache (``generate()``'s decode steps) are not recorded: one query
against a cache says little about prefill attention. A recorded call's cache arguments are
dropped and ``use_cache=False`` set where the model takes it, so replaying it for calibration
neither grows the user's cache nor needs one (causal LMs capture only without a cache).
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnopt._steps import timed

__all__ = ["DEFAULT_CALLS", "defer_optimize", "is_planning_pending"]

log = logging.getLogger("attnopt")

#: Calls recorded before planning starts: 3 to calibrate on, 1 held out for the end-to-end check
#: (:attr:`~attnopt.calibration.stats.CalibrationConfig.heldout_fraction` = 0.25).
DEFAULT_CALLS = 4

_ATTR = "_attnopt_deferred"
#: Keyword arguments that carry or index a KV cache (``past_key_values``; ``cache`` since
#: transformers 5.24). Any argument holding an object with ``get_seq_length`` counts too.
_CACHE_ARGS = ("past_key_values", "cache", "past_key_value", "cache_position")


def is_planning_pending(model: torch.nn.Module) -> bool:
    """Whether ``model`` is still recording its first calls for a deferred plan."""
    return _ATTR in model.__dict__


#: ``optimize(model, budget, calls, **options)``: plans on the recorded calls and installs the plan.
Optimize = Callable[..., torch.nn.Module]


def defer_optimize(
    model: torch.nn.Module,
    budget: Any,
    optimize: Optimize,
    undo: Callable[[torch.nn.Module], Any],
    *,
    calls: int = DEFAULT_CALLS,
    families: Sequence[str] | None = None,
    exclude: Any = (),
    **options: Any,
) -> torch.nn.Module:
    """Make ``model`` plan itself on its first ``calls`` calls; returns ``model``.

    Args:
        model: modified in place (its instance ``forward`` records calls until planning).
        budget, families, exclude, options: as for :func:`attnopt.optimize`.
        optimize: runs the pipeline on the recorded calls (``attnopt.pipeline.run_optimize``;
            passed in, so this module stays below the pipeline it defers).
        undo: removes whatever a failed ``optimize`` left installed (``uninstall_all``).
        calls: how many (prefill) calls to record before planning.
    """
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise TypeError(f"Expected calib_calls to be an int >= 1, but got calib_calls={calls!r}.")
    state = _Recorder(model, budget, calls, dict(families=families, exclude=exclude, **options), optimize, undo)
    model.__dict__.pop("forward", None)
    model.__dict__[_ATTR] = state
    model.forward = state.forward
    return model


class _Recorder:
    """The instance ``forward`` of a model waiting for its first calls."""

    def __init__(
        self, model: torch.nn.Module, budget: Any, n: int, kwargs: dict[str, Any], optimize: Optimize, undo
    ) -> None:
        self.optimize, self.undo = optimize, undo
        self.model = model
        self.budget = budget
        self.n = n
        self.kwargs = kwargs
        self.original = type(model).forward.__get__(model)
        self.calls: list[tuple[tuple, dict]] = []
        self.takes_use_cache = "use_cache" in _parameters(self.original)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self._recordable(args, kwargs)  # before the call fills the cache it was given
        out = self.original(*args, **kwargs)
        if call is not None:
            self.calls.append(call)
            if len(self.calls) >= self.n:
                self._plan()
        return out

    def _recordable(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        caches = [v for k, v in kwargs.items() if _is_cache(k, v)]
        if any(_cached_length(c) > 0 for c in caches):
            return None  # a decode step
        kept = {k: v for k, v in kwargs.items() if not _is_cache(k, v) and k not in _CACHE_ARGS}
        if self.takes_use_cache:
            kept["use_cache"] = False
        detach = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kept.items()}

    def _plan(self) -> None:
        model = self.model
        model.__dict__.pop(_ATTR, None)
        model.__dict__.pop("forward", None)  # planning calls the model's own forward
        progress = self.kwargs.get("progress", True)
        if progress:
            print(f"attnopt: planning {type(model).__name__} on its first {len(self.calls)} call(s)...",
                  file=sys.stderr)
        took: dict[str, float] = {}
        try:
            with timed(took, "plan"):
                self.optimize(model, self.budget, self.calls, **self.kwargs)
        except Exception as e:  # noqa: BLE001 - a failed deferred plan must leave the model working
            self.undo(model)
            model.__dict__.pop("_attnopt_plan", None)
            warnings.warn(
                f"attnopt: planning {type(model).__name__} on its first {len(self.calls)} call(s) failed "
                f"({type(e).__name__}: {_first_line(e)}); the model runs unchanged.",
                stacklevel=3,
            )
            log.debug("deferred planning failed", exc_info=True)
            return
        plan = getattr(model, "_attnopt_plan", None)
        if progress and plan is not None:
            print(f"attnopt: planned in {took['plan']:.1f} s: {plan.headline()}", file=sys.stderr)


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _is_cache(name: str, value: Any) -> bool:
    return value is not None and (name in _CACHE_ARGS[:3] or callable(getattr(value, "get_seq_length", None)))


def _cached_length(cache: Any) -> int:
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        try:
            return int(get())
        except Exception:  # noqa: BLE001 - an unknown cache object: treat it as a continuation
            return 1
    return 1


def _first_line(e: BaseException) -> str:
    """The error's message on one line (a capture error lists every method tried, one per line)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines())
    return text[:600] if text else type(e).__name__
