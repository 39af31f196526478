"""The public entry points: validate, dispatch to the named passes, return.

The pipeline reads top to bottom: capture → find sites → calibrate → candidates → cost →
plan → codegen → rewrite. Each function here only validates its arguments and runs the passes
in that order; the work lives in the rooms named by DESIGN.md.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from attnopt.patterns.context import GraphContext
from attnopt.patterns.find import assign_names, find_sites_in_graph, prefix_sites
from attnopt.patterns.site import AttentionSite
from attnopt.rewriter.capture import CAPTURE_METHODS, CapturedPart, CaptureError, capture, capture_parts

__all__ = ["find_sites", "optimize", "plan", "apply", "load_plan", "backend", "as_call", "capture_sites"]

log = logging.getLogger("attnopt")


def as_call(example: Any) -> tuple[tuple, dict]:
    """Normalise one example call to ``(args, kwargs)``.

    Accepted: a tensor (one positional argument), a tuple or list of positional arguments, a
    dict of keyword arguments, or an explicit ``(args_tuple, kwargs_dict)`` pair.
    """
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, (tuple, list)):
        if len(example) == 2 and isinstance(example[0], (tuple, list)) and isinstance(example[1], dict):
            return tuple(example[0]), dict(example[1])
        return tuple(example), {}
    raise TypeError(
        f"Expected an example call as a tensor, a tuple of positional args or a dict of keyword args, "
        f"but got {type(example).__name__}."
    )


def capture_sites(
    model: torch.nn.Module, args: tuple, kwargs: dict, methods: Sequence[str] = CAPTURE_METHODS
) -> tuple[list[CapturedPart], list[AttentionSite]]:
    """Capture ``model(*args, **kwargs)`` and find its attention sites.

    torch.export is tried on the whole model, then on its parts (the layers of a model whose
    top-level ``forward`` cannot be exported); only if that finds nothing do dynamo and
    symbolic_trace get the whole model. (Dynamo always "succeeds", but it silently runs frames
    it skips — e.g. ``torch.nn`` layers after a graph break — without giving their graphs.)
    Site names are module paths from the model's root, unique per model.
    """
    _check_runs(model, args, kwargs)
    errors: list[str] = []
    parts: list[CapturedPart] = []
    if "export" in methods:
        try:
            parts = capture_parts(model, args, kwargs, ("export",))
        except CaptureError as e:
            errors.append(str(e))
    sites = _find_in_parts(parts)
    rest = tuple(m for m in methods if m != "export")
    if not sites and rest:
        try:
            parts = [CapturedPart("", model, capture(model, args, kwargs, rest))]
            sites = _find_in_parts(parts)
        except CaptureError as e:
            if not parts:
                raise CaptureError("\n".join(errors + [str(e)])) from e
    return parts, sites


def _find_in_parts(parts: list[CapturedPart]) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for part in parts:
        for gm, flat in part.captured.graphs:
            found = find_sites_in_graph(GraphContext(gm, flat))
            prefix_sites(found, part.path)
            sites.extend(found)
    assign_names(sites)
    return sites


def _check_runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the example once so a bad input fails with the model's own error plus our context."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        raise type(e)(
            f"{e}\n(attnopt: the example call does not run {type(model).__name__}; pass inputs the model accepts, "
            f"e.g. calib=[{{'input_ids': ...}}])"
        ) from e


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


def optimize(
    model: torch.nn.Module,
    budget: Any = "2x",
    calib: Iterable[Any] | None = None,
    *,
    families: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    **options: Any,
) -> torch.nn.Module:
    """Rewrite ``model``'s attention within ``budget``; returns the same model object.

    Args:
        model: any ``nn.Module`` (Hugging Face models included); modified in place.
        budget: ``"2x"``, ``"1.5x"``, ``"1x"`` (exact everywhere), ``"latency<=4ms"`` or an
            :class:`attnopt.Budget`.
        calib: example calls of the model (tensors, tuples of positional args, dicts of
            keyword args); the first one is used to capture the graph, all of them to calibrate.
        families: restrict the variant families considered.
        exclude: site-name wildcards that stay exact (e.g. ``["model.layers.0.*"]``).

    Returns:
        ``model`` itself, whose ``forward`` now runs the planned attention.

    Raises:
        ValueError: a malformed budget, or no calibration example.
    """
    from attnopt.pipeline import run_optimize

    return run_optimize(model, budget, calib, families=families, exclude=exclude, **options)


def _warn_no_sites(model: torch.nn.Module) -> None:
    warnings.warn(
        f"attnopt found 0 attention sites in {type(model).__name__}; the model is returned unchanged.",
        stacklevel=3,
    )


def plan(
    model: torch.nn.Module,
    budget: Any = "2x",
    calib: Iterable[Any] | None = None,
    target: str | None = None,
    **options: Any,
):
    """Calibrate and plan ``model`` without changing what it computes; returns a :class:`Plan`.

    ``target`` names a device profile (``"h100"``, ``"a100"``) so a plan for a GPU can be made
    on a machine without one: calibration runs where the model is, latency comes from the
    target's profile. Save it with ``plan.save(dir)``; apply it later with :func:`apply`.

    Example::

        >>> p = attnopt.plan(model, budget="2x", calib=batches)
        >>> print(p.summary())          # site, family, config, predicted/measured ms, error
        >>> p.save("plan/")
    """
    from attnopt.pipeline import run_plan
    from attnopt.rewriter.install import uninstall_all

    run = run_plan(model, budget, calib, target=target, **options)
    uninstall_all(model)  # plan() leaves the model as it was
    run.plan._sites = run.sites
    run.plan._stats = run.stats
    return run.plan


def apply(model: torch.nn.Module, plan: Any, example: Any = None) -> torch.nn.Module:
    """Apply a plan (from :func:`plan` or :func:`load_plan`) to ``model``; no calibration needed.

    With ``example`` (one call, as in ``calib``), the model is captured first and the plan's
    attention fingerprint is checked against it, so a plan made for another model fails with a
    message naming the differences, before anything changes.
    """
    from attnopt.pipeline import install_plan

    sites = getattr(plan, "_sites", None)
    if example is not None:
        args, kwargs = as_call(example)
        _, sites = capture_sites(model, args, kwargs)
        plan.check_fingerprint(sites)
    return install_plan(model, plan, sites)


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
    from attnopt.pipeline import plan_choices
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
        if e.family == "head_pruned":
            raise NotImplementedError(
                f"plan entry {e.site} prunes heads, which changes weights; apply it with attnopt.apply(model, plan) "
                "before torch.compile(model, backend='attnopt')."
            )

    def choose(site: AttentionSite):
        return choices.get(site.name) if site.rewritable else None

    return RewriteBackend(choose, inductor=True)
