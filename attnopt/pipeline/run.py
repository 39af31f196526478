"""The run: ``optimize()`` and ``plan()`` as their named, timed steps.

    capture → find → calibrate → candidates → cost/plan → validate (tighten) → rewrite

:func:`run_plan` stops after validation and returns the :class:`Plan`; :func:`run_optimize`
also installs it. The model runs exact ``attnopt`` operators from the calibration step on, so
trying a plan end to end needs no recompilation: operator overrides stand in for the plan.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnopt._steps import timed
from attnopt.calibration.engine import calibrate
from attnopt.cost_model._timing import median_time
from attnopt.cost_model.plan import Plan
from attnopt.cost_model.planning import PlanProblem, exact_plan
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.site_stats import SiteStats
from attnopt.pipeline.candidates import Exclude, build_candidates, resolve_exclude
from attnopt.pipeline.metrics import output_error, resolve_metric
from attnopt.pipeline.request import PlanRequest
from attnopt.pipeline.validation import validate_plan
from attnopt.rewriter.apply import install_choices, install_plan
from attnopt.rewriter.calls import fresh_args
from attnopt.rewriter.capture import CapturedPart
from attnopt.rewriter.hf_route import route_reason, routed_sites
from attnopt.rewriter.install import uninstall_all
from attnopt.rewriter.overrides import overrides, plan_overrides
from attnopt.rewriter.rewrite import Choice
from attnopt.rewriter.sites import capture_sites
from attnopt.rewriter.verify import PlanMismatchError, module_structure

__all__ = ["PlanRun", "ROUTE_TOLERANCE", "run_optimize", "run_plan", "warn_no_sites"]

log = logging.getLogger("attnopt")


@dataclass
class PlanRun:
    """Everything a planning run produced (the plan plus what was needed to make it)."""

    plan: Plan
    parts: list[CapturedPart]
    sites: list[AttentionSite]
    stats: dict[str, SiteStats] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    first_call: tuple[tuple, dict] = ((), {})


def run_plan(model: torch.nn.Module, budget: Any, calib: Iterable[Any] | None, **options: Any) -> PlanRun:
    """Capture, calibrate and plan ``model`` (see :func:`attnopt.plan`); leaves exact ops installed.

    ``options`` are :meth:`PlanRequest.create`'s: ``families``, ``exclude``, ``target``,
    ``measure``, ``validate``, ``calibration``, ``progress``.
    """
    return plan_model(model, PlanRequest.create(model, budget, calib, **options))


def plan_model(model: torch.nn.Module, request: PlanRequest) -> PlanRun:
    """The planning run's steps, in order, each timed under its name in ``Plan.timings``.

    Anything that stops the run (an error, an out-of-memory, ``KeyboardInterrupt``) leaves the
    model as it was: the exact operators installed for calibration are taken out again.
    """
    try:
        return _plan_steps(model, request)
    except BaseException:
        uninstall_all(model)
        raise


def _plan_steps(model: torch.nn.Module, request: PlanRequest) -> PlanRun:
    timings: dict[str, float] = {}
    first = request.calls[0]
    with timed(timings, "capture"):
        parts, sites = capture_sites(model, *first)
    log.info("find: %d site(s), %d rewritable", len(sites), sum(s.rewritable for s in sites))
    if not sites:
        return PlanRun(Plan(entries=[], budget=request.budget, timings=timings), parts, sites, first_call=first)
    for s in sites:
        if not s.rewritable:
            log.info("kept exact: %s (%s)", s.name, s.reason)
    excluded = resolve_exclude(request.exclude, sites)
    modules = module_structure(model, sites)
    request = _run_exact_operators(model, parts, sites, request)
    if not request.asks_for_speed:  # "1x": exact everywhere; nothing to calibrate or measure
        plan = exact_plan(sites, request.budget, timings)
        plan.parts, plan.modules = [p.path for p in parts], modules
        return PlanRun(plan, parts, sites, first_call=first)
    rewritable = [s.name for s in sites if s.rewritable]
    _warn_if_all_excluded(request, rewritable, excluded)
    train, held = request.split()
    with timed(timings, "calibrate"):
        stats = calibrate(model, train, request.calibration, sites=rewritable, progress=request.progress)
    with timed(timings, "candidates"):
        candidates = build_candidates(sites, stats, request.families, excluded, timings)
    problem = _problem(model, request, sites, candidates, stats, excluded, timings)
    plan = problem.solve(timings=timings)
    timings.update(plan.timings)  # measurement and solve; re-solves below count as "validate"
    steps: list[str] = []
    if request.validate and (any(e.family != "exact" for e in plan.entries) or not plan.feasible):
        plan, steps = validate_plan(model, problem, plan, train, held, timings)
    plan.timings, plan.parts, plan.modules, plan.steps = timings, [p.path for p in parts], modules, steps
    return PlanRun(plan, parts, sites, stats, steps, first_call=first)


def _run_exact_operators(
    model: torch.nn.Module, parts: list[CapturedPart], sites: list[AttentionSite], request: PlanRequest
) -> PlanRequest:
    """Install exact ``attnopt`` operators at every rewritable site (calibration observes them, plans
    are tried through them); the request's metric is made concrete from the model's own output."""
    args, kwargs = request.calls[0]
    with torch.no_grad():
        first_out = model(*fresh_args(args), **kwargs)
    exact = {s.name: Choice("exact") for s in sites if s.rewritable}
    install_choices(model, parts, exact, expected={s.name: s.structure() for s in sites})
    return request.replace(budget=resolve_metric(request.budget, first_out, list(request.calls)))


def _warn_if_all_excluded(request: PlanRequest, rewritable: list[str], excluded: list[str]) -> None:
    if rewritable and set(rewritable) <= set(excluded):
        warnings.warn(
            f"attnopt: exclude={request.exclude!r} keeps every rewritable site exact ({len(rewritable)} site(s)); "
            "the plan can make nothing faster.",
            stacklevel=5,
        )


def _problem(model, request: PlanRequest, sites, candidates, stats, excluded, timings) -> PlanProblem:  # noqa: ANN001
    """The cost model's problem for this run (the profile is resolved here, timed as "profile")."""
    model_seconds = None
    if request.budget.scope == "model":
        model_seconds = timings["model forward"] = _forward_seconds(model, request.calls[0])
    return PlanProblem.create(
        sites, candidates, request.budget, profile=request.target, timings=timings, stats=stats,
        measure=request.measure, families=request.families, exclude=excluded or None, model_seconds=model_seconds,
    )  # fmt: skip


def _forward_seconds(model: torch.nn.Module, call: tuple[tuple, dict], repeats: int = 3) -> float:
    """Median seconds of one whole forward of ``call`` (exact attention), for ``scope="model"``."""
    args, kwargs = call
    with torch.no_grad():
        return median_time(lambda: model(*args, **kwargs), warmup=1, repeats=repeats)

def run_optimize(
    model: torch.nn.Module,
    budget: Any,
    calib: Iterable[Any] | None,
    *,
    families: Sequence[str] | None = None,
    exclude: Exclude | None = (),
    **options: Any,
) -> torch.nn.Module:
    """Implementation of :func:`attnopt.optimize` (see there)."""
    run = run_plan(model, budget, calib, families=families, exclude=exclude, **options)
    if not run.sites:
        uninstall_all(model)
        warn_no_sites(model)
        return model
    plan = run.plan
    if plan.explanation:
        log.warning("%s", plan.explanation)
    args, kwargs = run.first_call
    reference = None
    if any(e.family != "exact" for e in plan.entries) and route_reason(model, [e.site for e in plan.entries]) is None:
        # What the plan computes on the graph path (exact operators plus the plan's overrides,
        # as validated): the registry route must compute the same.
        try:
            with torch.no_grad(), overrides(plan_overrides(plan)):
                reference = model(*fresh_args(args), **kwargs)
        except BaseException:  # an interrupt here leaves the model as it was, too
            uninstall_all(model)
            raise
    install_plan(model, plan, run.sites)
    model._attnopt_sites = run.sites
    # One call through the installed plan: compiles it now rather than at the user's first call,
    # and checks every planned site is met (a plan matching nothing raises here, not silently later).
    if routed_sites(model):
        _check_route(model, plan, run.sites, (args, kwargs), reference)
    else:
        with torch.no_grad():
            model(*fresh_args(args), **kwargs)
    _say_what_changed(model, plan)
    return model


#: Largest relative error between the registry route's output and the graph path's for the same
#: plan: both run the same operators, so anything above float round-off means the route differs.
ROUTE_TOLERANCE = 1e-3


def _check_route(model: torch.nn.Module, plan: Plan, sites, call, reference: Any) -> None:
    """Run ``call`` through the routed plan; fall back to the graph rewrite if it differs or fails."""
    args, kwargs = call
    why = None
    try:
        with torch.no_grad():
            out = model(*fresh_args(args), **kwargs)
        if reference is not None:
            err = output_error(out, reference, "output_rel_error")
            if not err <= ROUTE_TOLERANCE:
                why = f"its output differs from the graph rewrite's by {err:.3g}"
    except PlanMismatchError as e:
        why = str(e)
    if why is None:
        log.info("attnopt: %d site(s) routed through transformers' AttentionInterface", len(routed_sites(model)))
        return
    log.warning("attnopt: running the plan through the graph rewrite, not transformers' AttentionInterface: %s", why)
    install_plan(model, plan, sites, prefer_route=False)
    with torch.no_grad():
        model(*fresh_args(args), **kwargs)


def warn_no_sites(model: torch.nn.Module) -> None:
    """Tell the user a model with no attention site comes back unchanged."""
    warnings.warn(
        f"attnopt found 0 attention sites in {type(model).__name__}; the model is returned unchanged.",
        stacklevel=4,
    )


def _say_what_changed(model: torch.nn.Module, plan: Plan) -> None:
    """Log the plan in one line; warn when a speed target was asked and every site stayed exact."""
    varied = [e for e in plan.entries if e.family != "exact"]
    log.info("attnopt: %s", plan.headline())
    if not varied and plan.budget.has_speed_target:
        why = plan.explanation or "no candidate was faster than exact attention within the tolerance"
        warnings.warn(
            f"attnopt: every attention site of {type(model).__name__} stays exact ({why}).",
            stacklevel=4,
        )
