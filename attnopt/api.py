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
from attnopt.rewriter.capture import CAPTURE_METHODS, CapturedPart, capture_parts

__all__ = ["find_sites", "optimize", "as_call", "capture_sites"]

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
    """Capture ``model(*args, **kwargs)`` (whole, or by parts) and find its attention sites.

    Site names are module paths from the model's root, unique per model.
    """
    _check_runs(model, args, kwargs)
    parts = capture_parts(model, args, kwargs, methods)
    sites: list[AttentionSite] = []
    for part in parts:
        for gm, flat in part.captured.graphs:
            found = find_sites_in_graph(GraphContext(gm, flat))
            prefix_sites(found, part.path)
            sites.extend(found)
    assign_names(sites)
    return parts, sites


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
