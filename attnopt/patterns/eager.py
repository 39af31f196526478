"""Matcher for attention written by hand: ``softmax(scale · q·kᵀ + masks) [→ dropout] → · v``.

* ``eager_softmax`` — anchored at the softmax; the walks of :mod:`attnopt.patterns.eager_walks`
  find the score product above it and the value product below it, and this module reads
  q, k, v, heads and the layout off those two products — 4-D ``matmul``, ``(B*H, N, D)``
  ``bmm``/``baddbmm`` with the head count recovered from the layout, or ``einsum`` in any
  letter order.

A softmax is only attention if its scores come from a product of two *activations* and its
probabilities multiply a third: an MoE router's ``softmax(x @ W)`` and a classifier's softmax
are never reported.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from attnopt.patterns.canon import Op, canon, node_shape, real_users
from attnopt.patterns.context import GraphContext
from attnopt.patterns.eager_walks import Scores, lead_regroup, walk_probs, walk_scores
from attnopt.patterns.matchutil import op_arg, prescale, skip, value_of
from attnopt.patterns.records import SiteMatch
from attnopt.patterns.walk import (
    fold_regrouped_repeat_kv,
    fold_repeat_kv,
    fold_scalar_scale,
    strip_identity,
    strip_transpose_last2,
)

__all__ = ["match_eager_softmax"]


def _qk_operands(op: Op) -> tuple[Any, Any]:
    """The two factors of the score product (``batch1``/``batch2`` of a baddbmm, positional or keyword)."""
    if op.kind == "baddbmm":
        return op_arg(op, 1, "batch1"), op_arg(op, 2, "batch2")
    return op.args[0], op.args[1]


def _einsum_parts(op: Op) -> tuple[str, list[str], list]:
    eq = op.args[0].replace(" ", "")
    operands = list(op.args[1]) if isinstance(op.args[1], (list, tuple)) else list(op.args[1:])
    lhs, out = eq.split("->")
    return out, lhs.split(","), operands


def match_eager_softmax(ctx: GraphContext, node: fx.Node, op: Op) -> SiteMatch | None:
    """Hand-written attention anchored at its softmax."""
    dim = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
    shape = node_shape(node)
    if shape is None or dim is None or int(dim) not in (-1, len(shape) - 1):
        return skip(node, "softmax not over the last dimension")
    scores = walk_scores(op.input, ctx)
    if scores is None:
        return skip(node, "softmax input is not a scaled/masked product of two activations")
    probs = walk_probs(node, ctx)
    if probs is None:
        return skip(node, "softmax output does not multiply a value tensor")
    pv, pchain, drop, external = probs
    qk_op = canon(scores.qk, ctx.gm)
    pv_op = canon(pv, ctx.gm)
    if _depends_on(_second_operand(pv_op), node):
        return skip(node, "the product after the softmax multiplies something computed from the probabilities, not V")
    if qk_op.kind == "einsum" or pv_op.kind == "einsum":
        m = _einsum_match(ctx, node, scores, qk_op, pv, pv_op)
    else:
        m = _matmul_match(ctx, node, scores, qk_op, pv, pv_op)
    if m is None:
        return None
    m.mask_terms = scores.terms
    m.dropout = drop
    m.internal = scores.chain | pchain | {node}
    if scores.softcap:
        m.unsupported = "scores pass through tanh soft-capping, which no variant reproduces yet"
    elif external or any(u not in m.internal and u is not pv for n in m.internal for u in real_users(n)):
        m.unsupported = "attention probabilities or scores are also used outside the attention (e.g. returned as attention weights); call with need_weights=False / output_attentions=False"
    elif drop > 0:
        m.unsupported = f"attention dropout p={drop} is active (training mode); call model.eval() first"
    return m


def _matmul_match(ctx, anchor, scores: Scores, qk_op: Op, pv: fx.Node, pv_op: Op) -> SiteMatch | None:
    a, b = _qk_operands(qk_op)
    v = pv_op.args[1]
    if ctx.is_constant(a) or ctx.is_constant(b) or ctx.is_constant(v):
        return skip(anchor, "Q·Kᵀ or P·V multiplies a weight, not two activations")
    resolve = value_of(ctx)
    q, q_scale = fold_scalar_scale(a, ctx.gm, resolve)
    # A scale may sit on either side of Kᵀ (DeBERTa divides the transposed key).
    b, kt_scale = fold_scalar_scale(b, ctx.gm, resolve)
    k_t, k_is_t = strip_transpose_last2(b, ctx.gm)
    k_pre, k_scale = fold_scalar_scale(k_t, ctx.gm, resolve) if k_is_t else (k_t, 1.0)
    scale = scores.scale * q_scale * kt_scale * k_scale
    qs, vs = node_shape(q), node_shape(v)
    if qs is None or vs is None or len(qs) not in (3, 4):
        return skip(anchor, "Q·Kᵀ operands are not 3-D or 4-D")
    # a scale on K before its heads were repeated (GQA) still scales every score
    k_unrepeated = k_pre
    if k_is_t:
        k_unrepeated, _ = (fold_repeat_kv if len(qs) == 4 else fold_regrouped_repeat_kv)(k_pre, ctx.gm)
    hidden = prescale(q, ctx) * (prescale(k_unrepeated, ctx) if k_is_t else 1.0)
    if len(qs) == 4:
        k_base, rep = fold_repeat_kv(k_pre, ctx.gm) if k_is_t else (k_pre, 1)
        v_base, rep_v = fold_repeat_kv(v, ctx.gm)
        if rep != rep_v:
            k_base, v_base = k_pre, v
        ks, vbs = node_shape(k_base), node_shape(v_base)
        layout = dict(
            k=k_base, v=v_base, num_heads=qs[1], num_kv_heads=ks[1], head_dim=qs[3], head_dim_v=vbs[3],
            batch=qs[0], q_len=qs[2], kv_len=ks[2] if k_is_t else ks[3],
        )  # fmt: skip
    else:
        # (B*H, N, D): recover the head count from how q was laid out.
        bh, nq, d = qs
        heads = scores.regroup[1] if scores.regroup else (_heads_from_layout(q, d, ctx) or 1)
        batch = bh // heads if bh % heads == 0 else bh
        heads = heads if bh % heads == 0 else 1
        ks = node_shape(k_pre)
        form = ("bh", batch, heads)
        layout = dict(
            k=k_pre, v=v, num_heads=heads, num_kv_heads=heads, head_dim=d, head_dim_v=vs[-1], batch=batch,
            q_len=nq, kv_len=ks[1] if k_is_t else ks[2], q_form=form, k_form=form, v_form=form, out_form=form,
        )  # fmt: skip
        # K and V repeated per query head before the (B*H, N, D) view: keep the KV heads (GQA)
        k_base, rep = fold_regrouped_repeat_kv(k_pre, ctx.gm) if k_is_t else (k_pre, 1)
        v_base, rep_v = fold_regrouped_repeat_kv(v, ctx.gm)
        if rep > 1 and rep == rep_v and heads % rep == 0:
            layout.update(k=k_base, v=v_base, num_kv_heads=heads // rep, k_form="bhnd", v_form="bhnd")
    return SiteMatch(
        pattern="eager_softmax", anchor=anchor, output=pv, q=q, scale=scale * hidden, op_scale=scale,
        k_transposed=not k_is_t, **layout,
    )  # fmt: skip


def _second_operand(op: Op) -> Any:
    if op.kind == "einsum":
        return _einsum_parts(op)[2][1]
    return op.args[1]


def _depends_on(x: Any, anchor: fx.Node, limit: int = 256) -> bool:
    """Whether graph value ``x`` is computed from ``anchor`` (only nodes after it in graph order
    can be; the walk is bounded and answers True when it cannot finish, so a doubtful V is refused)."""
    if not isinstance(x, fx.Node):
        return False
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    start = order[anchor]
    todo, seen = [x], set()
    while todo:
        n = todo.pop()
        if n is anchor:
            return True
        if n in seen or order.get(n, -1) <= start:
            continue
        seen.add(n)
        if len(seen) > limit:
            return True
        todo.extend(a for a in n.all_input_nodes)
    return False


def _heads_from_layout(x: Any, d: int, ctx: GraphContext) -> int | None:
    """Find ``H`` for a ``(B*H, N, D)`` tensor: the reshape that split ``H*D`` into heads."""
    cur = x
    for _ in range(12):
        cur = strip_identity(cur, ctx.gm)
        op = canon(cur, ctx.gm)
        if op is None or op.kind not in ("reshape", "transpose", "permute", "mul", "div"):
            break
        if op.kind == "reshape":
            split = lead_regroup(op.input, cur)
            if split:  # (B, H, N, D) -> (B*H, N, D): H is the split's second dim
                return split[1]
            s = node_shape(op.input)
            if s and s[-1] % d == 0 and s[-1] > d:
                return s[-1] // d
        cur = op.input
    return None


def _einsum_match(ctx, anchor, scores: Scores, qk_op: Op, pv: fx.Node, pv_op: Op) -> SiteMatch | None:
    if qk_op.kind != "einsum" or pv_op.kind != "einsum":
        return skip(anchor, "mixed einsum/matmul attention is not matched")
    s_out, (qa, ka), (q_in, k_in) = _einsum_parts(qk_op)
    o_out, (pa, va), (_, v_in) = _einsum_parts(pv_op)
    if len(s_out) < 3 or len(qa) != len(ka):
        return skip(anchor, "einsum scores are not (batch..., q, k)")
    qlet, klet = s_out[-2], s_out[-1]
    batch_letters = s_out[:-2]
    dlet = [c for c in qa if c in ka and c not in s_out]
    if len(dlet) != 1 or qlet not in qa or klet not in ka:
        return skip(anchor, "einsum does not contract one head dimension")
    # Map the P operand's letters onto the score letters by position.
    ren = dict(zip(pa, s_out))
    va_r = "".join(ren.get(c, c) for c in va)
    o_r = "".join(ren.get(c, c) for c in o_out)
    elet = [c for c in va_r if c not in s_out]
    if len(elet) != 1 or klet not in va_r:
        return skip(anchor, "einsum P·V does not contract the key dimension")
    d, e = dlet[0], elet[0]
    want_q, want_k, want_v, got_o = (
        batch_letters + qlet + d,
        batch_letters + klet + d,
        batch_letters + klet + e,
        batch_letters + qlet + e,
    )
    if sorted(o_r) != sorted(got_o) or len(batch_letters) not in (1, 2):
        return skip(anchor, "einsum output layout not understood")
    perm_q = [qa.index(c) for c in want_q]
    perm_k = [ka.index(c) for c in want_k]
    perm_v = [va_r.index(c) for c in want_v]
    perm_o = [got_o.index(c) for c in o_r]
    resolve = value_of(ctx)
    q, q_scale = fold_scalar_scale(q_in, ctx.gm, resolve)
    if len(perm_k) == 4 and len(perm_v) == 4:  # K and V repeated per query head: keep the KV heads
        k_base, rep = fold_repeat_kv(k_in, ctx.gm, axis=perm_k[1])
        v_base, rep_v = fold_repeat_kv(v_in, ctx.gm, axis=perm_v[1])
        if rep > 1 and rep == rep_v:
            k_in, v_in = k_base, v_base
    k_in, k_scale = fold_scalar_scale(k_in, ctx.gm, resolve)
    op_scale = scores.scale * q_scale * k_scale
    hidden = prescale(q, ctx) * prescale(k_in, ctx)  # scales applied before the head view (Whisper)
    qs, ks, vs = node_shape(q), node_shape(k_in), node_shape(v_in)
    qb = [qs[i] for i in perm_q]
    kb = [ks[i] for i in perm_k]
    vb = [vs[i] for i in perm_v]
    if len(batch_letters) == 1:
        return skip(anchor, "single-batch-dim einsum attention is not matched")
    return SiteMatch(
        pattern="eager_softmax",
        anchor=anchor,
        output=pv,
        q=q,
        k=k_in,
        v=v_in,
        scale=op_scale * hidden,
        op_scale=op_scale,
        num_heads=qb[1],
        num_kv_heads=kb[1],
        head_dim=qb[3],
        head_dim_v=vb[3],
        batch=qb[0],
        q_len=qb[2],
        kv_len=kb[2],
        q_form=("perm", perm_q),
        k_form=("perm", perm_k),
        v_form=("perm", perm_v),
        out_form=("perm", perm_o),
    )
