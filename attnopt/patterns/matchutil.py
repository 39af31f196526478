"""What every matcher needs besides the graph walks: operand access, constants, debug skips.

The SDPA, eager and ``multi_head_attention_forward`` matchers live in separate modules; the
few questions they all ask of a node (an argument by position or keyword, its value when it is
a constant scalar — including one the graph computes from constants —, whether it is a bool
mask) are answered once here so that the matchers agree on them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from attnopt.patterns.canon import Op, node_dtype, node_shape, scalar_value
from attnopt.patterns.context import GraphContext
from attnopt.patterns.walk import prescale_under_layout

__all__ = ["skip", "op_arg", "is_bool", "const_scalar", "value_of", "prescale", "log"]

log = logging.getLogger("attnopt.patterns")


def skip(node: fx.Node, why: str) -> None:
    """Log at debug level why ``node`` is not attention; returns None for ``return skip(...)``."""
    log.debug("not attention at %s: %s", node.name, why)
    return None


def op_arg(op: Op, i: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``op``, given by keyword or at position ``i``."""
    if name in op.kwargs:
        return op.kwargs[name]
    return op.args[i] if len(op.args) > i else default


def is_bool(node: fx.Node) -> bool:
    """Whether ``node`` is a bool tensor (a keep/drop mask rather than an additive one)."""
    return node_dtype(node) == torch.bool


def const_scalar(x: Any, ctx: GraphContext) -> float | None:
    """``x`` as a float when it is a constant: a number, a 1-element constant tensor, or a
    Python number the graph computes from constants (``d ** -0.5``); else ``None``."""
    c = scalar_value(x)
    if c is not None or not isinstance(x, fx.Node):
        return c
    shape = node_shape(x)
    if shape is None or all(s == 1 for s in shape):
        # a 1-element tensor constant, or a Python number computed in the graph (``d ** -0.5``)
        val = ctx.value(x)
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return float(val)
        if (
            val is not None
            and hasattr(val, "numel")
            and val.numel() == 1
            and not ctx.depends_on_input_values(x)
        ):
            return float(val.reshape(()))
    return None


def value_of(ctx: GraphContext) -> Callable[[Any], float | None]:
    """Constant resolution for the walks, including scales computed in the graph from constants."""
    return lambda x: const_scalar(x, ctx)


def prescale(x: Any, ctx: GraphContext) -> float:
    """Scalar factor applied to q (or k) before its head view (see ``prescale_under_layout``)."""
    return prescale_under_layout(x, ctx.gm, value_of=value_of(ctx))
