"""The public entry points: validate, dispatch to the named passes, return.

The pipeline reads top to bottom: capture → find sites → calibrate → candidates → cost →
plan → codegen → rewrite. Each function here only validates its arguments and runs the passes
in that order; the work lives in the rooms named by DESIGN.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from attnopt.cost_model.budget import parse_budget
from attnopt.patterns.site import AttentionSite
from attnopt.rewriter.calls import as_call
from attnopt.rewriter.sites import capture_sites

__all__ = [
    "find_sites",
    "optimize",
    "plan",
    "apply",
    "load_plan",
    "backend",
    "installed_plan",
    "as_call",
    "capture_sites",
    "PLAN_OPTIONS",
]

log = logging.getLogger("attnopt")


def find_sites(model: torch.nn.Module, *args: Any, **kwargs: Any) -> list[AttentionSite]:
    """Every attention site of ``model`` when called as ``model(*args, **kwargs)``.

    The model is captured with torch.export, falling back to dynamo and then
    torch.fx.symbolic_trace. Sites whose scores carry something no variant reproduces yet
    (a learned bias, tanh soft-capping, returned attention weights) are listed with
    ``rewritable=False`` and a ``reason``.

    Example::

        >>> sites = attnopt.find_sites(model, input_ids=ids, use_cache=False)
        >>> print(sites[0])
        model.layers.0.self_attn#0: sdpa heads=4/2kv d=8 N=16x16 mask=causal causal=True ...

    Raises:
        attnopt.rewriter.capture.CaptureError: no capture method worked (each is named).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, but got {type(model).__name__}.")
    _, sites = capture_sites(model, args, kwargs)
    return sites


#: Keyword options of :func:`optimize` and :func:`plan` beyond budget, calib, families, exclude.
PLAN_OPTIONS = {
    "target": "a device profile name ('h100', 'a100') to plan for instead of this machine",
    "measure": "True / 'auto' / False: time candidates here (default 'auto' for this machine)",
    "validate": "bool: check the plan end to end on held-out calibration calls (default True)",
    "calibration": "an attnopt.calibration.stats.CalibrationConfig",
    "progress": "bool: show progress bars and what was chosen (default True)",
}
#: Options only :func:`optimize` takes.
OPTIMIZE_OPTIONS = {**PLAN_OPTIONS, "calib_calls": "int: first calls to plan on when calib= is not given (default 4)"}


def optimize(
    model: torch.nn.Module,
    budget: Any = "2x",
    calib: Iterable[Any] | None = None,
    *,
    families: Sequence[str] | None = None,
    exclude: Any = (),
    **options: Any,
) -> torch.nn.Module:
    """Rewrite ``model``'s attention within ``budget``; returns the same model object.

    Args:
        model: any ``nn.Module`` (Hugging Face models included); modified in place.
        budget: ``"2x"``, ``"1.5x"``, ``"1x"`` (exact everywhere), ``"latency<=4ms"`` or an
            :class:`attnopt.Budget`.
        calib: example calls of the model (tensors, tuples of positional args, mappings of
            keyword args such as a tokenizer's output); the first one is used to capture the
            graph, all of them to calibrate. Without it, the model's first ``calib_calls`` calls
            (default 4) run unchanged and are recorded, the plan is made inside the last of them,
            and later calls run it (see :mod:`attnopt.deferred`).
        families: restrict the variant families considered.
        exclude: sites that stay exact: a glob over site names (``"model.layers.0.*"``), a list
            of globs, or a predicate ``(AttentionSite) -> bool``.
        **options: see :data:`OPTIMIZE_OPTIONS` (``target``, ``measure``, ``validate``,
            ``calibration``, ``progress``, ``calib_calls``).

    Returns:
        ``model`` itself, whose ``forward`` now runs the planned attention.

    Raises:
        ValueError: a malformed budget.
        TypeError: an unknown option, or an option of the wrong type.
        attnopt.PlanMismatchError: the installed plan did not match the running model's sites.

    Example::

        >>> model = attnopt.optimize(model, "2x", calib=[{"input_ids": ids}])
        >>> attnopt.installed_plan(model).headline()
        '4 site(s): block_sparse x3, head_pruned x1; predicted 2.11x attention; perplexity ...'
    """
    _validate_model(model)
    _validate_options("optimize", options, OPTIMIZE_OPTIONS)
    _validate_exclude(exclude)
    budget = parse_budget(budget)  # parsed once, here: a malformed budget fails now, not at the first call
    calls = options.pop("calib_calls", None)
    from attnopt.pipeline import run_optimize
    from attnopt.rewriter.install import uninstall_all

    if calib is None:
        from attnopt.deferred import DEFAULT_CALLS, defer_optimize

        uninstall_all(model)
        return defer_optimize(
            model, budget, run_optimize, uninstall_all, calls=DEFAULT_CALLS if calls is None else calls,
            families=families, exclude=exclude, **options,
        )
    return run_optimize(model, budget, calib, families=families, exclude=exclude, **options)


def plan(
    model: torch.nn.Module,
    budget: Any = "2x",
    calib: Iterable[Any] | None = None,
    target: str | None = None,
    *,
    families: Sequence[str] | None = None,
    exclude: Any = (),
    **options: Any,
):
    """Calibrate and plan ``model`` without changing what it computes; returns a :class:`Plan`.

    ``target`` names a device profile (``"h100"``, ``"a100"``) so a plan for a GPU can be made
    on a machine without one: calibration runs where the model is, latency comes from the
    target's profile. Save it with ``plan.save(dir)``; apply it later with :func:`apply`.
    ``families``, ``exclude`` and ``options`` are as for :func:`optimize` (``calib`` is required).

    Example::

        >>> p = attnopt.plan(model, budget="2x", calib=batches)
        >>> print(p.summary())          # site, family, config, predicted/measured ms, error
        >>> p.save("plan/")
    """
    from attnopt.pipeline import run_plan
    from attnopt.rewriter.install import uninstall_all

    _validate_model(model)
    _validate_options("plan", options, PLAN_OPTIONS)
    _validate_exclude(exclude)
    run = run_plan(model, budget, calib, target=target, families=families, exclude=exclude, **options)
    uninstall_all(model)  # plan() leaves the model as it was
    run.plan._sites = run.sites
    run.plan._stats = run.stats
    return run.plan


def apply(model: torch.nn.Module, plan: Any, example: Any = None) -> torch.nn.Module:
    """Apply a plan (from :func:`plan` or :func:`load_plan`) to ``model``; no calibration needed.

    The model's modules are checked against the plan's record before anything changes (each
    planned site's module, its class and its projections' shapes; a module of a planned class
    the plan does not name), so a plan made for another model is refused without an example
    call. The sites themselves are checked at the first call. With ``example`` (one call, as
    in ``calib``), the model is also captured and its full attention fingerprint compared.

    Raises:
        attnopt.PlanMismatchError: the plan does not fit ``model``, naming the first differences.
    """
    from attnopt.rewriter.apply import install_plan
    from attnopt.rewriter.verify import check_modules

    _validate_model(model)
    check_modules(model, [e.site for e in plan.entries], plan.modules)
    sites = getattr(plan, "_sites", None)
    if example is not None:
        args, kwargs = as_call(example, model)
        _, sites = capture_sites(model, args, kwargs)
        plan.check_fingerprint(sites)
    return install_plan(model, plan, sites)


def installed_plan(model: torch.nn.Module):
    """The :class:`Plan` installed on ``model`` by :func:`optimize` or :func:`apply`, or None.

    None also while a deferred :func:`optimize` (no ``calib=``) is still recording first calls.
    """
    return model.__dict__.get("_attnopt_plan")


def _validate_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, but got {type(model).__name__}.")


def _validate_options(fn: str, options: dict[str, Any], accepted: dict[str, str]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = "; ".join(f"{k}: {v}" for k, v in accepted.items())
        raise TypeError(
            f"attnopt.{fn}() got unknown option(s) {unknown}. Accepted: budget, calib, families, exclude; {listed}."
        )
    for key in ("validate", "progress"):
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"Expected {key}= to be a bool, but got {options[key]!r}.")
    if "measure" in options and options["measure"] not in (True, False, "auto", None):
        raise TypeError(f"Expected measure= to be True, False or 'auto', but got {options['measure']!r}.")


def _validate_exclude(exclude: Any) -> None:
    if exclude is None or isinstance(exclude, str) or callable(exclude):
        return
    if isinstance(exclude, Iterable) and all(isinstance(p, str) for p in exclude):
        return
    raise TypeError(
        "Expected exclude= to be a glob over site names ('model.layers.0.*'), a list of globs, or a "
        f"callable (site) -> bool, but got {exclude!r}."
    )


def load_plan(directory: Any):
    """Read a plan saved with ``Plan.save(dir)`` (validated; see :func:`attnopt.cost_model.plan.load_plan`)."""
    from attnopt.cost_model.plan import load_plan as _load

    return _load(directory)


def backend(
    plan: Any = None,
    *,
    budget: Any = None,
    calib: Iterable[Any] | None = None,
    model: torch.nn.Module | None = None,
):
    """A configured ``torch.compile`` backend: ``torch.compile(model, backend=attnopt.backend(plan=p))``.

    With ``plan``, sites run the plan's choices; with ``budget`` and ``calib`` (and ``model``),
    a plan is made first. With neither, every site runs exact attention. The rest of the graph
    is compiled by Inductor as usual.
    """
    from attnopt.replacements.base import rewrites_weights
    from attnopt.rewriter.apply import plan_choices
    from attnopt.rewriter.backend import RewriteBackend, exact_everywhere

    if plan is None and budget is not None:
        if model is None or calib is None:
            raise ValueError(
                "Expected model= and calib= with budget=, to plan before compiling; or pass plan=."
            )
        import attnopt.api as _api  # ``plan`` the argument shadows ``plan`` the function here

        plan = _api.plan(model, budget, calib)
    if plan is None:
        return RewriteBackend(exact_everywhere, inductor=True)
    choices = plan_choices(plan)
    for e in plan.entries:
        if rewrites_weights(e.family):
            raise NotImplementedError(
                f"plan entry {e.site} ({e.family}) changes weights, so a compile backend cannot run it; "
                "compile the applied model instead: torch.compile(attnopt.apply(model, plan, example=call)) "
                "(Hugging Face models then run the plan through transformers' AttentionInterface, which "
                "torch.compile traces)."
            )

    def choose(site: AttentionSite):
        return choices.get(site.name) if site.rewritable else None

    return RewriteBackend(choose, inductor=True)
