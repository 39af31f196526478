"""Small graph walks shared by the matchers: strip no-ops, fold GQA repeats and scales, find projections.

Each walk reads the canonical view (:mod:`attnopt.patterns.canon`) so it works on every
capture method. Walks never mutate the graph; they return nodes and facts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from attnopt.patterns.canon import canon, node_shape, scalar_value
from attnopt.patterns.context import GraphContext

__all__ = [
    "prescale_under_layout",
    "strip_identity",
    "strip_transpose_last2",
    "fold_repeat_kv",
    "fold_regrouped_repeat_kv",
    "fold_scalar_scale",
    "find_projection",
    "linear_input",
    "projection_path",
    "Projection",
    "only_user",
]


def only_user(node: fx.Node) -> fx.Node | None:
    """The single user of ``node``, or None if it has zero or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def strip_identity(node: Any, gm: fx.GraphModule | None = None) -> Any:
    """Walk up through casts, copies and inference-mode dropout."""
    while True:
        op = canon(node, gm)
        if op is None:
            return node
        if op.kind == "identity" or (op.kind == "dropout" and _dropout_inactive(op)):
            node = op.input
            continue
        return node


def _dropout_inactive(op) -> bool:
    if op.node is not None and op.node.op == "call_module":
        return not op.kwargs.get("train", False) or op.kwargs.get("p", 0) == 0
    p = op.kwargs.get("p", op.args[1] if len(op.args) > 1 else 0.5)
    train = op.kwargs.get("train", op.kwargs.get("training", op.args[2] if len(op.args) > 2 else True))
    return p == 0 or train is False


def dropout_prob(op) -> float:
    """Probability of an active dropout op (0.0 when inactive)."""
    if _dropout_inactive(op):
        return 0.0
    if op.node is not None and op.node.op == "call_module":
        return float(op.kwargs.get("p", 0.0))
    return float(op.kwargs.get("p", op.args[1] if len(op.args) > 1 else 0.5))


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def strip_transpose_last2(node: Any, gm: fx.GraphModule | None = None) -> tuple[Any, bool]:
    """If ``node`` is ``x.transpose(-2, -1)`` (any spelling), return ``(x, True)``; else ``(node, False)``."""
    node = strip_identity(node, gm)
    op = canon(node, gm)
    shape = node_shape(node)
    if op is None or shape is None:
        return node, False
    rank = len(shape)
    if op.kind == "transpose":
        d0, d1 = (_norm_dim(int(d), rank) for d in op.args[1:3])
        if {d0, d1} == {rank - 1, rank - 2}:
            return op.input, True
    if op.kind == "t" and rank == 2:
        return op.input, True
    if op.kind == "permute":
        dims = op.args[1] if len(op.args) == 2 and isinstance(op.args[1], (list, tuple)) else op.args[1:]
        dims = [_norm_dim(int(d), rank) for d in dims]
        if dims == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return op.input, True
    return node, False


#: Resolves an operand to a Python float when it is a constant (``scalar_value`` by default;
#: matchers pass one that also evaluates scales computed in the graph, e.g. DeBERTa's
#: ``sqrt(tensor(d) * 3)``), else ``None``.
ValueOf = Callable[[Any], float | None]


def fold_scalar_scale(
    node: Any, gm: fx.GraphModule | None = None, value_of: ValueOf = scalar_value
) -> tuple[Any, float]:
    """Walk up through ``x * c`` and ``x / c`` with constant ``c``; return the base and the product."""
    scale = 1.0
    while True:
        node = strip_identity(node, gm)
        op = canon(node, gm)
        if op is None or op.kind not in ("mul", "div"):
            return node, scale
        a, b = op.args[0], op.args[1] if len(op.args) > 1 else None
        c = value_of(b)
        if c is None and op.kind == "mul":
            c, a = value_of(a), b
        if c is None or c == 0 or not isinstance(a, fx.Node):
            return node, scale
        scale = scale * c if op.kind == "mul" else scale / c
        node = a


_LAYOUT_KINDS = ("identity", "transpose", "permute", "reshape", "t")


def prescale_under_layout(
    node: Any, gm: fx.GraphModule | None = None, max_steps: int = 12, value_of: ValueOf = scalar_value
) -> float:
    """Scalar factor applied to q (or k) *before* its view/transpose into heads.

    Whisper writes ``(q_proj(x) * d**-0.5).view(...).transpose(...)`` and then attention with
    scale 1; the site's softmax scale is that factor. The operator still receives the scaled
    tensor (and applies only the remaining scale), so only the *reported* scale changes.
    """
    factor = 1.0
    for _ in range(max_steps):
        op = canon(node, gm)
        if op is None:
            return factor
        if op.kind in _LAYOUT_KINDS:
            node = op.input
            continue
        if op.kind not in ("mul", "div"):
            return factor
        a, b = op.args[0], op.args[1] if len(op.args) > 1 else None
        c = value_of(b)
        if c is None and op.kind == "mul":
            c, a = value_of(a), b
        if c is None or c == 0 or not isinstance(a, fx.Node):
            return factor
        factor = factor * c if op.kind == "mul" else factor / c
        node = a
    return factor


def fold_repeat_kv(node: Any, gm: fx.GraphModule | None = None, axis: int = 1) -> tuple[Any, int]:
    """Undo GQA/MQA head repetition along the heads ``axis`` of a 4-D tensor; return ``(base, n_rep)``.

    Recognises ``x.unsqueeze(axis + 1).expand(...)`` followed by a ``reshape``/``view``/``flatten``
    that merges the new dim into the heads (HF ``repeat_kv`` at ``axis=1``, in torch, dynamo and
    aten spellings, with optional copies between) and ``x.repeat_interleave(r, dim=axis)``.
    ``axis`` is 1 for ``(B, H, N, D)`` and 2 for ``(B, N, H, D)`` (einsum-written attention).
    """
    start = strip_identity(node, gm)
    op = canon(start, gm)
    out_shape = node_shape(start)
    if op is None or out_shape is None or len(out_shape) != 4:
        return node, 1
    if op.kind == "repeat_interleave":
        reps = op.args[1] if len(op.args) > 1 else op.kwargs.get("repeats")
        dim = op.kwargs.get("dim", op.args[2] if len(op.args) > 2 else None)
        if isinstance(reps, int) and dim is not None and _norm_dim(int(dim), 4) == axis:
            return op.input, reps
        return node, 1
    if op.kind != "reshape":
        return node, 1
    expanded = strip_identity(op.input, gm)
    eop = canon(expanded, gm)
    eshape = node_shape(expanded)
    if eop is None or eop.kind != "expand" or eshape is None or len(eshape) != 5:
        return node, 1
    unsq = strip_identity(eop.input, gm)
    uop = canon(unsq, gm)
    ushape = node_shape(unsq)
    if (
        uop is None
        or uop.kind not in ("unsqueeze", "getitem_unsqueeze")
        or ushape is None
        or len(ushape) != 5
    ):
        return node, 1
    if ushape[axis + 1] != 1:
        return node, 1
    r = eshape[axis + 1]
    merged = (*eshape[:axis], eshape[axis] * r, *eshape[axis + 2 :])
    if tuple(out_shape) != merged:
        return node, 1
    return uop.input, r


def fold_regrouped_repeat_kv(node: Any, gm: fx.GraphModule | None = None) -> tuple[Any, int]:
    """:func:`fold_repeat_kv` under a ``(B, H, N, D) -> (B*H, N, D)`` view (Bloom-style layouts).

    Returns the 4-D base ``(B, Hkv, N, D)`` and the repeat, or ``(node, 1)`` when ``node`` is not
    such a view of a repeated tensor.
    """
    start = strip_identity(node, gm)
    op = canon(start, gm)
    src, dst = (node_shape(op.input), node_shape(start)) if op is not None and op.kind == "reshape" else (None, None)
    if src is None or dst is None or len(src) != 4 or len(dst) != 3 or src[0] * src[1] != dst[0]:
        return node, 1
    if tuple(src[2:]) != tuple(dst[1:]):
        return node, 1
    base, rep = fold_repeat_kv(op.input, gm)
    return (base, rep) if rep > 1 else (node, 1)


@dataclass
class Projection:
    """A linear layer that produced (part of) q, k, v or consumed the attention output."""

    module_path: str
    node: fx.Node
    input: Any  # the activation fed to the projection
    packed: bool = False


_LINEAR_TARGETS = {"linear", "addmm"}


def linear_input(node: fx.Node, ctx: GraphContext) -> Any | None:
    """If ``node`` is a linear layer (F.linear, aten.linear, addmm/matmul with a weight, nn.Linear), its input."""
    import torch.nn as nn

    if node.op == "call_module":
        try:
            mod = ctx.gm.get_submodule(node.target)
        except AttributeError:
            return None
        return node.args[0] if isinstance(mod, nn.Linear) else None
    name = getattr(node.target, "__name__", str(node.target))
    base = name.split(".")[0]
    if node.op == "call_function" and (base in _LINEAR_TARGETS or str(node.target).startswith("aten.linear")):
        if "addmm" in str(node.target) or base == "addmm":
            return node.args[1] if ctx.is_constant(node.args[2]) else None
        if len(node.args) > 1 and ctx.is_constant(node.args[1]):
            return node.args[0]
    op = canon(node, ctx.gm)
    if op is not None and op.kind == "matmul" and ctx.is_constant(op.args[1]):
        return op.args[0]
    return None


# Ops a walk from q/k/v back to its projection may pass through: layout, casts, RoPE arithmetic,
# splitting a packed projection.
_PASS_KINDS = {
    "identity",
    "transpose",
    "permute",
    "reshape",
    "mul",
    "div",
    "add",
    "expand",
    "unsqueeze",
    "getitem_unsqueeze",
    "repeat_interleave",
}
_PASS_NAMES = (
    "split",
    "chunk",
    "getitem",
    "slice",
    "select",
    "unflatten",
    "squeeze",
    "unbind",
    "contiguous",
    "view",
    "narrow",
    "cat",
    "neg",
    "_unsafe_view",
    "clone",
    "permute",
    "transpose",
)


def find_projection(node: Any, ctx: GraphContext, max_steps: int = 40) -> Projection | None:
    """Walk up from a q/k/v tensor to the linear layer that produced it (first input first)."""
    cur, steps, packed = node, 0, False
    while isinstance(cur, fx.Node) and steps < max_steps:
        steps += 1
        inp = linear_input(cur, ctx)
        if inp is not None:
            return Projection(module_path=projection_path(cur, ctx), node=cur, input=inp, packed=packed)
        op = canon(cur, ctx.gm)
        name = getattr(cur.target, "__name__", str(cur.target))
        if op is not None and op.kind in _PASS_KINDS:
            nxt = op.input
        elif any(p in name for p in _PASS_NAMES):
            if any(p in name for p in ("split", "chunk", "unbind", "select", "getitem", "slice", "narrow")):
                packed = packed or _splits_last_dim(cur)
            nxt = cur.args[0] if cur.args else None
            if isinstance(nxt, (list, tuple)):
                nxt = nxt[-1] if nxt else None
        else:
            return None
        cur = nxt
    return None


def _splits_last_dim(node: fx.Node) -> bool:
    return "split" in str(node.target) or "chunk" in str(node.target) or "unbind" in str(node.target)


def projection_path(node: fx.Node, ctx: GraphContext) -> str:
    if node.op == "call_module":
        return str(node.target)
    return ctx.module_path(node)
