"""A model's attention sites: capture it as graphs, then find the attention in them.

The one place capture (:mod:`~attnopt.rewriter.capture`) and matching
(:mod:`attnopt.patterns`) meet, for :func:`attnopt.find_sites`, planning and ``apply(example=)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnopt.patterns.canon import module_names_of
from attnopt.patterns.context import GraphContext
from attnopt.patterns.find import assign_names, find_sites_in_graph, prefix_sites
from attnopt.patterns.site import AttentionSite
from attnopt.rewriter.calls import fresh_args
from attnopt.rewriter.capture import CAPTURE_METHODS, CapturedPart, CaptureError, capture, capture_parts

__all__ = ["capture_sites"]


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
            parts = capture_parts(model, fresh_args(args), kwargs, ("export",))
        except CaptureError as e:
            errors.append(str(e))
    sites = _find_in_parts(parts)
    rest = tuple(m for m in methods if m != "export")
    if not sites and rest:
        try:
            parts = [CapturedPart("", model, capture(model, fresh_args(args), kwargs, rest))]
            sites = _find_in_parts(parts)
        except CaptureError as e:
            if not parts:
                raise CaptureError("\n".join(errors + [str(e)])) from e
    return parts, sites


def _find_in_parts(parts: list[CapturedPart]) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for part in parts:
        for gm, flat in part.captured.graphs:
            found = find_sites_in_graph(GraphContext(gm, flat, module_names=module_names_of(part.module)))
            prefix_sites(found, part.path)
            sites.extend(found)
    assign_names(sites)
    return sites


def _check_runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the example once so a bad input fails with the model's own error plus our context."""
    try:
        with torch.no_grad():
            model(*fresh_args(args), **kwargs)
    except Exception as e:
        raise type(e)(
            f"{e}\n(attnopt: the example call does not run {type(model).__name__}; pass inputs the model accepts, "
            f"e.g. calib=[{{'input_ids': ...}}])"
        ) from e
