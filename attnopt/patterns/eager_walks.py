"""The walks of the eager matcher: from a softmax up to Q·Kᵀ and down to P·V.

Hand-written attention is anchored at its softmax. :func:`walk_scores` follows the softmax
input up through scales, additive / ``masked_fill`` / ``where`` masks, a tanh soft-cap and
``(B*H) <-> (B, H)`` regroupings to the score product, collecting what it passes;
:func:`walk_probs` follows the probabilities down through casts and dropout to the product with
the values. Kept apart from :mod:`attnopt.patterns.eager`, which turns the two ends into a
:class:`~attnopt.patterns.records.SiteMatch`, so each module stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from attnopt.patterns.canon import Op, canon, node_shape, real_users
from attnopt.patterns.context import GraphContext
from attnopt.patterns.matchutil import const_scalar, op_arg
from attnopt.patterns.records import MaskTerm
from attnopt.patterns.walk import dropout_prob, strip_identity

__all__ = ["Scores", "QK_KINDS", "walk_scores", "walk_probs", "lead_regroup", "first_operand"]

#: An additive or filled value at or below this masks the score out.
_VERY_NEGATIVE = -1.0e3


@dataclass
class Scores:
    """What :func:`walk_scores` found above a softmax: the Q·Kᵀ node, the scale and masks
    applied to it, and the nodes it passed (``chain``, replaced along with the site)."""

    qk: fx.Node
    scale: float
    terms: list[MaskTerm]
    chain: set
    softcap: bool = False
    bias_terms: list = field(default_factory=list)
    #: ``(batch, heads)`` when the scores were regrouped between ``(B*H, N, M)`` and
    #: ``(B, H, N, M)`` on the way to the softmax (Bloom, Falcon, DeBERTa); it names the head
    #: count of a ``(B*H, N, D)`` q directly.
    regroup: tuple[int, int] | None = None


#: Canonical kinds that can compute the Q·Kᵀ scores.
QK_KINDS = ("matmul", "einsum", "baddbmm")


def lead_regroup(src: Any, dst: Any) -> tuple[int, int] | tuple[()] | None:
    """How a reshape from ``src`` to ``dst`` regroups the leading (batch, heads) dims.

    ``()`` for a same-shape view, ``(B, H)`` for ``(B*H, N, M) <-> (B, H, N, M)``, ``None`` when
    the reshape touches the last two dims (then it is not a layout-only step of attention).
    """
    s, d = node_shape(src), node_shape(dst)
    if s is None or d is None or s[-2:] != d[-2:]:
        return None
    if s == d:
        return ()
    four, three = (s, d) if len(s) == 4 else (d, s)
    if len(four) == 4 and len(three) == 3 and four[0] * four[1] == three[0]:
        return four[0], four[1]
    return None


def _baddbmm_scores(op: Op, ctx: GraphContext, scale: float, terms: list[MaskTerm]) -> float | None:
    """``bias·beta + alpha·(a @ b)`` (ALiBi in Bloom): record the bias as a term, return the new scale."""
    beta = const_scalar(op.kwargs.get("beta", 1.0), ctx)
    alpha = const_scalar(op.kwargs.get("alpha", 1.0), ctx)
    if beta is None or alpha is None:
        return None
    bias = op_arg(op, 0, "input")
    if isinstance(bias, fx.Node) and beta != 0:
        terms.append(MaskTerm(bias, "add", scale * beta))
    return scale * alpha


def _reaches_qk(x: Any, ctx: GraphContext, depth: int = 12) -> bool:
    while isinstance(x, fx.Node) and depth > 0:
        depth -= 1
        op = canon(strip_identity(x, ctx.gm), ctx.gm)
        if op is None:
            return False
        if op.kind in QK_KINDS:
            return True
        if op.kind in ("mul", "div", "add", "masked_fill", "tanh", "reshape"):
            x = op.input
        elif op.kind == "where":
            return _reaches_qk(op.args[1], ctx, depth) or _reaches_qk(op.args[2], ctx, depth)
        else:
            return False
    return False


def walk_scores(x: Any, ctx: GraphContext) -> Scores | None:
    """Walk up from the softmax input to the Q·Kᵀ product, collecting scale and masks."""
    scale, terms, chain, softcap, regroup = 1.0, [], set(), False, None
    for _ in range(32):
        x0 = x
        x = strip_identity(x, ctx.gm)
        chain.update(_identity_chain(x0, x))
        op = canon(x, ctx.gm)
        if op is None:
            return None
        chain.add(x)
        kind = op.kind
        if kind in QK_KINDS:
            if kind == "baddbmm" and (scale := _baddbmm_scores(op, ctx, scale, terms)) is None:
                return None
            return Scores(x, scale, terms, chain, softcap, regroup=regroup)
        if kind == "reshape":
            split = lead_regroup(op.input, x)
            if split is None:
                return None
            regroup = split or regroup
            x = op.input
            continue
        if kind in ("mul", "div"):
            a, b = op.args[0], op.args[1]
            c = const_scalar(b, ctx)
            if c is None and kind == "mul":
                c, a = const_scalar(a, ctx), b
            if c is None or c == 0:
                return None
            factor = c if kind == "mul" else 1.0 / c
            scale *= factor
            x = a
        elif kind == "add":
            a, b = op.args[0], op.args[1]
            if const_scalar(b, ctx) is not None and not isinstance(b, fx.Node):
                x = a  # adding a constant does not change the softmax
            elif _reaches_qk(a, ctx):
                terms.append(MaskTerm(b, "add", scale))
                x = a
            elif _reaches_qk(b, ctx):
                terms.append(MaskTerm(a, "add", scale))
                x = b
            else:
                return None
        elif kind == "masked_fill":
            value = const_scalar(op.args[2], ctx)
            if value is None or value > _VERY_NEGATIVE:
                return None
            terms.append(MaskTerm(op.args[1], "drop"))
            x = op.input
        elif kind == "where":
            cond, a, b = op.args[:3]
            va, vb = const_scalar(a, ctx), const_scalar(b, ctx)
            if vb is not None and vb <= _VERY_NEGATIVE:
                terms.append(MaskTerm(cond, "keep"))
                x = a
            elif va is not None and va <= _VERY_NEGATIVE:
                terms.append(MaskTerm(cond, "drop"))
                x = b
            else:
                return None
        elif kind == "tanh":
            softcap = True
            x = op.input
        else:
            return None
    return None


def _identity_chain(top: Any, bottom: Any) -> set:
    out, cur = set(), top
    while isinstance(cur, fx.Node) and cur is not bottom:
        out.add(cur)
        cur = cur.args[0] if cur.args else None
    return out


def walk_probs(p: fx.Node, ctx: GraphContext) -> tuple[fx.Node, set, float, bool] | None:
    """Walk down from the softmax to the P·V product: (pv node, chain, dropout p, P used elsewhere)."""
    chain, cur, drop, external = set(), p, 0.0, False
    for _ in range(16):
        nxt = None
        users = real_users(cur)
        for u in users:
            op = canon(u, ctx.gm)
            if op is None:
                external = True
                continue
            if op.kind in ("identity", "dropout") or (
                op.kind == "reshape" and lead_regroup(cur, u) is not None
            ):
                if nxt is None:
                    nxt = u
                    if op.kind == "dropout":
                        drop = max(drop, dropout_prob(op))
                else:
                    external = True
            elif op.kind in ("matmul", "einsum") and first_operand(op) is cur:
                return u, chain, drop, external or len(users) > 1
            else:
                external = True
        if nxt is None:
            return None
        chain.add(nxt)
        cur = nxt
    return None


def first_operand(op: Op) -> Any:
    if op.kind == "einsum":
        ops = op.args[1:] if not isinstance(op.args[1], (list, tuple)) else op.args[1]
        return ops[0]
    return op.args[0]
