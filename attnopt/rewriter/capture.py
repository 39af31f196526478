"""Capture a model's graph: torch.export first, then dynamo, then torch.fx.symbolic_trace.

Each method has its own reach: torch.export handles Hugging Face models (symbolic_trace does
not); dynamo handles code with graph breaks (and is what a ``torch.compile`` backend receives);
symbolic_trace handles plain modules without example inputs' help. The first that succeeds is
used; if all fail, the error names each method and why it failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from attnopt.rewriter.backend import weakly

__all__ = ["Captured", "CapturedPart", "CaptureError", "capture", "capture_parts", "CAPTURE_METHODS"]

log = logging.getLogger("attnopt.rewriter")

CAPTURE_METHODS = ("export", "dynamo", "symbolic_trace")


class CaptureError(RuntimeError):
    """No capture method could turn the model into a graph."""


@dataclass
class Captured:
    """Graphs of one model call: ``graphs`` holds ``(GraphModule, flat example inputs)`` pairs
    (one for export/symbolic_trace, one per graph-break segment for dynamo)."""

    method: str
    graphs: list[tuple[fx.GraphModule, list[Any]]] = field(default_factory=list)
    exported: Any = None  # the ExportedProgram when method == "export"


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module()
    from torch.fx._pytree import tree_flatten_spec

    flat = tree_flatten_spec((args, kwargs), ep.call_spec.in_spec)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(flat) != len(placeholders):  # non-tensor leaves are not placeholders
        flat = [x for x in flat if isinstance(x, torch.Tensor)]
    return Captured("export", [(gm, list(flat))], exported=ep)


def _dynamo(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []
    # Dynamo keeps the backend for the life of the process: it reaches the list through a box
    # emptied once capture is done, so neither the graphs nor their example inputs stay behind.
    box = [graphs]

    def backend(gm: fx.GraphModule, example_inputs: list[Any]):
        box[0].append((gm, list(example_inputs)))
        return weakly(gm)

    compiled = torch.compile(model, backend=backend, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        box.clear()
    if not graphs:
        raise RuntimeError("dynamo produced no graph")
    return Captured("dynamo", graphs)


def _symbolic_trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat: list[Any] = list(args)
    for p in placeholders[len(args) :]:
        if p.target in kwargs:
            flat.append(kwargs[p.target])
        else:
            flat.append(p.args[0] if p.args else None)
    ShapeProp(gm).propagate(*flat)
    return Captured("symbolic_trace", [(gm, flat)])


_METHODS = {"export": _export, "dynamo": _dynamo, "symbolic_trace": _symbolic_trace}


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    methods: Sequence[str] = CAPTURE_METHODS,
) -> Captured:
    """Capture ``model(*args, **kwargs)`` with the first method in ``methods`` that works.

    Raises:
        ValueError: an unknown method name.
        CaptureError: every method failed; the message lists each failure.
    """
    kwargs = kwargs or {}
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise ValueError(f"Expected capture methods from {CAPTURE_METHODS}, but got {unknown}.")
    failures = []
    for name in methods:
        try:
            result = _METHODS[name](model, tuple(args), kwargs)
            log.info("captured %s with %s (%d graph(s))", type(model).__name__, name, len(result.graphs))
            return result
        except Exception as e:  # noqa: BLE001 - try the next method, report all at the end
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            failures.append(f"{name}: {type(e).__name__}: {first}")
            log.debug("capture with %s failed", name, exc_info=True)
    raise CaptureError(
        f"attnopt could not capture {type(model).__name__}: every capture method failed:\n  "
        + "\n  ".join(failures)
    )


# Modules that never contain attention: no point capturing them on their own.
_LEAF_TYPES = (
    torch.nn.Linear,
    torch.nn.LayerNorm,
    torch.nn.Embedding,
    torch.nn.Dropout,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.GELU,
    torch.nn.ReLU,
    torch.nn.SiLU,
    torch.nn.Identity,
    torch.nn.Softmax,
)


@dataclass
class CapturedPart:
    """A captured submodule: its dotted path from the root ('' = the whole model)."""

    path: str
    module: torch.nn.Module
    captured: Captured


def _record_calls(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple[tuple, dict]]:
    """Run ``model`` once, recording the first call's inputs of every submodule (by path)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, _LEAF_TYPES):
            continue

        def hook(_mod, a, k, _name=name):
            calls.setdefault(_name, (tuple(a), dict(k)))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _called_children(module: torch.nn.Module, path: str, calls: dict) -> list[tuple[str, torch.nn.Module]]:
    """Children that were called; containers never called themselves (ModuleList) are opened."""
    out = []
    for name, child in module.named_children():
        sub = f"{path}.{name}" if path else name
        if sub in calls:
            out.append((sub, child))
        elif not isinstance(child, _LEAF_TYPES):
            out.extend(_called_children(child, sub, calls))
    return out


def capture_parts(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    methods: Sequence[str] = CAPTURE_METHODS,
) -> list[CapturedPart]:
    """Capture the whole model, or else the largest submodules that can be captured.

    Models whose top-level ``forward`` has data-dependent Python (``if mask.all():``,
    ``.item()``) defeat every whole-graph method; their layers usually do not. The model runs
    once with hooks recording every submodule's inputs; then each called child of a module that
    failed is captured the same way, recursively. Raises :class:`CaptureError` only if nothing
    at all could be captured.
    """
    kwargs = kwargs or {}
    try:
        return [CapturedPart("", model, capture(model, args, kwargs, methods))]
    except CaptureError as whole_error:
        calls = _record_calls(model, args, kwargs)
        parts: list[CapturedPart] = []
        pending = _called_children(model, "", calls)
        while pending:
            path, child = pending.pop(0)
            try:
                parts.append(CapturedPart(path, child, capture(child, *calls[path], methods)))
            except CaptureError:
                log.debug("could not capture %s; trying its children", path)
                pending[:0] = _called_children(child, path, calls)
        if not parts:
            raise whole_error
        log.info(
            "captured %s in %d part(s): %s",
            type(model).__name__,
            len(parts),
            ", ".join(p.path for p in parts),
        )
        return parts
