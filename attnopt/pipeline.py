"""The optimisation pipeline as named steps, each logged: capture → find → calibrate → plan → rewrite."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from attnopt.cost_model.budget import parse_budget
from attnopt.patterns.site import AttentionSite
from attnopt.rewriter.install import install, uninstall_all
from attnopt.rewriter.rewrite import Choice

__all__ = ["run_optimize", "normalise_calib"]

log = logging.getLogger("attnopt")


def normalise_calib(calib: Iterable[Any] | None) -> list[tuple[tuple, dict]]:
    """``calib`` as a list of ``(args, kwargs)`` calls; a single tensor/dict counts as one call."""
    from attnopt.api import as_call

    if calib is None:
        return []
    if isinstance(calib, (torch.Tensor, dict)):
        calib = [calib]
    return [as_call(c) for c in calib]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


def run_optimize(
    model: torch.nn.Module,
    budget: Any,
    calib: Iterable[Any] | None,
    *,
    families: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    **options: Any,
) -> torch.nn.Module:
    """Implementation of :func:`attnopt.optimize` (see there)."""
    from attnopt.api import _warn_no_sites, capture_sites

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, but got {type(model).__name__}.")
    parsed = parse_budget(budget)
    calls = normalise_calib(calib)
    if not calls:
        raise ValueError(
            "Expected at least one calibration example in calib=, but got none. Pass calib=[example_call, ...] "
            "(a tensor, a tuple of positional args or a dict of keyword args)."
        )
    t0 = time.perf_counter()
    args, kwargs = calls[0]
    parts, sites = capture_sites(model, args, kwargs)
    log.info("find: %d site(s) in %.2fs", len(sites), time.perf_counter() - t0)
    if not sites:
        _warn_no_sites(model)
        return model
    for s in sites:
        if not s.rewritable:
            log.info("skip %s: %s", s.name, s.reason)
    choices = _exact_choices(sites, exclude)
    if parsed.speedup not in (None, 1.0) or parsed.latency_ms is not None:
        log.warning(
            "budget %s: exact attention is the only variant in this plan, so no speedup is applied; "
            "the exact plan is returned.",
            budget,
        )
    uninstall_all(model)
    for part in parts:
        install(part.module, _chooser(choices), prefix=part.path)
    model._attnopt_sites = sites  # for reports
    return model


def _exact_choices(sites: list[AttentionSite], exclude: Sequence[str]) -> dict[str, Choice]:
    return {s.name: Choice("exact") for s in sites if s.rewritable and not _excluded(s.name, exclude)}


def _chooser(choices: dict[str, Choice]):
    def choose(site: AttentionSite) -> Choice | None:
        if not site.rewritable:
            return None
        return choices.get(site.name)

    return choose
