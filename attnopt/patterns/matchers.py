"""Matchers: find attention in a graph, whatever way the model wrote it.

Matchers are records in :data:`MATCHERS` (name, anchor kinds, match function). A match
function looks at one anchor node and returns a :class:`SiteMatch` (graph references plus raw
facts) or ``None``, logging the reason at debug level. Matching reads the canonical view of
nodes (:mod:`attnopt.patterns.canon`), so ``matmul``/``bmm``/``einsum``, ``mul``/``div``,
``add``/``masked_fill``/``where``, casts and copies are covered once, in every capture method.

* ``sdpa`` — ``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention``.
* ``sdpa_fused`` — the backend-specific ``aten._scaled_dot_product_*`` ops.
* ``eager_softmax`` — ``softmax(scale · q·kᵀ + masks) [→ dropout] → · v`` written by hand.

A softmax is only attention if its scores come from a product of two *activations* and its
probabilities multiply a third: an MoE router's ``softmax(x @ W)`` and a classifier's softmax
are never reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from attnopt.patterns.canon import Op, canon, node_shape, real_users, scalar_value
from attnopt.patterns.context import GraphContext
from attnopt.patterns.records import MaskTerm, SiteMatch
from attnopt.patterns.walk import (
    dropout_prob,
    fold_repeat_kv,
    fold_scalar_scale,
    prescale_under_layout,
    strip_identity,
    strip_transpose_last2,
)

__all__ = ["SiteMatch", "Matcher", "MATCHERS", "MaskTerm"]

log = logging.getLogger("attnopt.patterns")

_VERY_NEGATIVE = -1.0e3


@dataclass(frozen=True)
class Matcher:
    """A named matcher: ``match(ctx, node)`` is tried on nodes whose canonical kind is in ``anchors``."""

    name: str
    anchors: tuple[str, ...]
    match: Callable[[GraphContext, fx.Node, Op], SiteMatch | None]


def _skip(node: fx.Node, why: str) -> None:
    log.debug("not attention at %s: %s", node.name, why)
    return None


# --------------------------------------------------------------------------------------- SDPA
def _arg(op: Op, i: int, name: str, default: Any = None) -> Any:
    if name in op.kwargs:
        return op.kwargs[name]
    return op.args[i] if len(op.args) > i else default


def _qkv_facts(q: Any, k: Any, v: Any) -> tuple | None:
    qs, ks, vs = node_shape(q), node_shape(k), node_shape(v)
    if not qs or not ks or not vs or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    return qs, ks, vs


def match_sdpa(ctx: GraphContext, node: fx.Node, op: Op) -> SiteMatch | None:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``."""
    q, k, v = op.args[:3]
    mask = _arg(op, 3, "attn_mask")
    dropout = _arg(op, 4, "dropout_p", 0.0) or 0.0
    is_causal = _arg(op, 5, "is_causal", False)
    scale = op.kwargs.get("scale", op.args[6] if len(op.args) > 6 else None)
    return _sdpa_site("sdpa", ctx, node, node, q, k, v, mask, dropout, is_causal, scale)


# Positional layout of the fused ops: (index of attn_mask or None, dropout index, is_causal index).
_FUSED_ARGS = {
    "_scaled_dot_product_flash_attention_for_cpu": (None, 3, 4),
    "_scaled_dot_product_flash_attention": (None, 3, 4),
    "_scaled_dot_product_efficient_attention": (3, 5, 6),
    "_scaled_dot_product_cudnn_attention": (3, 5, 6),
}


def match_sdpa_fused(ctx: GraphContext, node: fx.Node, op: Op) -> SiteMatch | None:
    """The backend ops SDPA lowers to; the site's output is ``getitem(op, 0)``."""
    name = str(node.target).split(".")[1] if "." in str(node.target) else str(node.target)
    mask_i, drop_i, causal_i = _FUSED_ARGS.get(name, (None, 3, 4))
    q, k, v = op.args[:3]
    mask = op.kwargs.get("attn_mask") if mask_i is None else _arg(op, mask_i, "attn_bias")
    dropout = _arg(op, drop_i, "dropout_p", 0.0) or 0.0
    is_causal = _arg(op, causal_i, "is_causal", False)
    scale = op.kwargs.get("scale")
    outs = [u for u in node.users if u.target.__name__ == "getitem"] if node.users else []
    out0 = [u for u in outs if u.args[1] == 0]
    if len(out0) != 1:
        return _skip(node, "fused SDPA output 0 is not used")
    m = _sdpa_site("sdpa_fused", ctx, node, out0[0], q, k, v, mask, dropout, is_causal, scale)
    if m is not None and any(u.args[1] != 0 and u.users for u in outs):
        m.unsupported = "the fused SDPA's log-sum-exp output is used by the model"
    return m


def _sdpa_site(pattern, ctx, anchor, output, q, k, v, mask, dropout, is_causal, scale) -> SiteMatch | None:
    if isinstance(is_causal, fx.Node) or isinstance(dropout, fx.Node):
        return _skip(anchor, "SDPA's is_causal/dropout_p are computed in the graph")
    dropout, is_causal = float(dropout), bool(is_causal)
    k_base, rep_k = fold_repeat_kv(k, ctx.gm)
    v_base, rep_v = fold_repeat_kv(v, ctx.gm)
    if rep_k != rep_v:
        k_base, v_base, rep_k = k, v, 1
    facts = _qkv_facts(q, k_base, v_base)
    if facts is None:
        return _skip(anchor, "SDPA inputs are not 4-D with known shapes")
    qs, ks, vs = facts
    d = qs[-1]
    unresolved = None
    if isinstance(scale, fx.Node):  # computed in the graph (e.g. under dynamic shapes)
        value = _const_scalar(scale, ctx)
        if value is None:
            unresolved, value = "the softmax scale is computed at run time from tensor values", 1.0
        scale = value
    op_scale = float(scale) if scale is not None else d**-0.5
    m = SiteMatch(
        pattern=pattern,
        anchor=anchor,
        output=output,
        q=q,
        k=k_base,
        v=v_base,
        scale=op_scale * _prescale(q, ctx) * _prescale(k_base, ctx),
        op_scale=op_scale,
        num_heads=qs[1],
        num_kv_heads=ks[1],
        head_dim=d,
        head_dim_v=vs[-1],
        batch=qs[0],
        q_len=qs[2],
        kv_len=ks[2],
        is_causal=is_causal,
        causal_align="top_left",
        dropout=dropout,
    )
    if isinstance(mask, fx.Node):
        m.mask_terms.append(MaskTerm(mask, "keep" if _is_bool(mask) else "add"))
    if unresolved:
        m.unsupported = unresolved
    elif dropout > 0:
        m.unsupported = f"attention dropout p={dropout} is active (training mode); call model.eval() first"
    return m


def _is_bool(node: fx.Node) -> bool:
    import torch

    from attnopt.patterns.canon import node_dtype

    return node_dtype(node) == torch.bool


# ------------------------------------------------------------------------- hand-written eager
@dataclass
class _Scores:
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


_QK_KINDS = ("matmul", "einsum", "baddbmm")


def _const_scalar(x: Any, ctx: GraphContext) -> float | None:
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


def _value_of(ctx: GraphContext) -> Callable[[Any], float | None]:
    """Constant resolution for the walks, including scales computed in the graph from constants."""
    return lambda x: _const_scalar(x, ctx)


def _prescale(x: Any, ctx: GraphContext) -> float:
    return prescale_under_layout(x, ctx.gm, value_of=_value_of(ctx))


def _lead_regroup(src: Any, dst: Any) -> tuple[int, int] | tuple[()] | None:
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
    beta = _const_scalar(op.kwargs.get("beta", 1.0), ctx)
    alpha = _const_scalar(op.kwargs.get("alpha", 1.0), ctx)
    if beta is None or alpha is None:
        return None
    bias = _arg(op, 0, "input")
    if isinstance(bias, fx.Node) and beta != 0:
        terms.append(MaskTerm(bias, "add", scale * beta))
    return scale * alpha


def _qk_operands(op: Op) -> tuple[Any, Any]:
    """The two factors of the score product (``batch1``/``batch2`` of a baddbmm, positional or keyword)."""
    if op.kind == "baddbmm":
        return _arg(op, 1, "batch1"), _arg(op, 2, "batch2")
    return op.args[0], op.args[1]


def _reaches_qk(x: Any, ctx: GraphContext, depth: int = 12) -> bool:
    while isinstance(x, fx.Node) and depth > 0:
        depth -= 1
        op = canon(strip_identity(x, ctx.gm), ctx.gm)
        if op is None:
            return False
        if op.kind in _QK_KINDS:
            return True
        if op.kind in ("mul", "div", "add", "masked_fill", "tanh", "reshape"):
            x = op.input
        elif op.kind == "where":
            return _reaches_qk(op.args[1], ctx, depth) or _reaches_qk(op.args[2], ctx, depth)
        else:
            return False
    return False


def _walk_scores(x: Any, ctx: GraphContext) -> _Scores | None:
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
        if kind in _QK_KINDS:
            if kind == "baddbmm" and (scale := _baddbmm_scores(op, ctx, scale, terms)) is None:
                return None
            return _Scores(x, scale, terms, chain, softcap, regroup=regroup)
        if kind == "reshape":
            split = _lead_regroup(op.input, x)
            if split is None:
                return None
            regroup = split or regroup
            x = op.input
            continue
        if kind in ("mul", "div"):
            a, b = op.args[0], op.args[1]
            c = _const_scalar(b, ctx)
            if c is None and kind == "mul":
                c, a = _const_scalar(a, ctx), b
            if c is None or c == 0:
                return None
            factor = c if kind == "mul" else 1.0 / c
            scale *= factor
            x = a
        elif kind == "add":
            a, b = op.args[0], op.args[1]
            if _const_scalar(b, ctx) is not None and not isinstance(b, fx.Node):
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
            value = _const_scalar(op.args[2], ctx)
            if value is None or value > _VERY_NEGATIVE:
                return None
            terms.append(MaskTerm(op.args[1], "drop"))
            x = op.input
        elif kind == "where":
            cond, a, b = op.args[:3]
            va, vb = _const_scalar(a, ctx), _const_scalar(b, ctx)
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


def _walk_probs(p: fx.Node, ctx: GraphContext) -> tuple[fx.Node, set, float, bool] | None:
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
                op.kind == "reshape" and _lead_regroup(cur, u) is not None
            ):
                if nxt is None:
                    nxt = u
                    if op.kind == "dropout":
                        drop = max(drop, dropout_prob(op))
                else:
                    external = True
            elif op.kind in ("matmul", "einsum") and _first_operand(op) is cur:
                return u, chain, drop, external or len(users) > 1
            else:
                external = True
        if nxt is None:
            return None
        chain.add(nxt)
        cur = nxt
    return None


def _first_operand(op: Op) -> Any:
    if op.kind == "einsum":
        ops = op.args[1:] if not isinstance(op.args[1], (list, tuple)) else op.args[1]
        return ops[0]
    return op.args[0]


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
        return _skip(node, "softmax not over the last dimension")
    scores = _walk_scores(op.input, ctx)
    if scores is None:
        return _skip(node, "softmax input is not a scaled/masked product of two activations")
    probs = _walk_probs(node, ctx)
    if probs is None:
        return _skip(node, "softmax output does not multiply a value tensor")
    pv, pchain, drop, external = probs
    qk_op = canon(scores.qk, ctx.gm)
    pv_op = canon(pv, ctx.gm)
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


def _matmul_match(ctx, anchor, scores: _Scores, qk_op: Op, pv: fx.Node, pv_op: Op) -> SiteMatch | None:
    a, b = _qk_operands(qk_op)
    v = pv_op.args[1]
    if ctx.is_constant(a) or ctx.is_constant(b) or ctx.is_constant(v):
        return _skip(anchor, "Q·Kᵀ or P·V multiplies a weight, not two activations")
    value_of = _value_of(ctx)
    q, q_scale = fold_scalar_scale(a, ctx.gm, value_of)
    # A scale may sit on either side of Kᵀ (DeBERTa divides the transposed key).
    b, kt_scale = fold_scalar_scale(b, ctx.gm, value_of)
    k_t, k_is_t = strip_transpose_last2(b, ctx.gm)
    k_pre, k_scale = fold_scalar_scale(k_t, ctx.gm, value_of) if k_is_t else (k_t, 1.0)
    scale = scores.scale * q_scale * kt_scale * k_scale
    hidden = _prescale(q, ctx) * (_prescale(k_pre, ctx) if k_is_t else 1.0)
    qs, vs = node_shape(q), node_shape(v)
    if qs is None or vs is None or len(qs) not in (3, 4):
        return _skip(anchor, "Q·Kᵀ operands are not 3-D or 4-D")
    if len(qs) == 4:
        k_base, rep = fold_repeat_kv(k_pre, ctx.gm) if k_is_t else (k_pre, 1)
        v_base, rep_v = fold_repeat_kv(v, ctx.gm)
        if rep != rep_v:
            k_base, v_base = k_pre, v
        ks, vbs = node_shape(k_base), node_shape(v_base)
        kv_len = ks[2] if k_is_t else ks[3]
        return SiteMatch(
            pattern="eager_softmax",
            anchor=anchor,
            output=pv,
            q=q,
            k=k_base,
            v=v_base,
            scale=scale * hidden,
            op_scale=scale,
            num_heads=qs[1],
            num_kv_heads=ks[1],
            head_dim=qs[3],
            head_dim_v=vbs[3],
            batch=qs[0],
            q_len=qs[2],
            kv_len=kv_len,
            k_transposed=not k_is_t,
        )
    # (B*H, N, D): recover the head count from how q was laid out.
    bh, nq, d = qs
    heads = scores.regroup[1] if scores.regroup else (_heads_from_layout(q, d, ctx) or 1)
    batch = bh // heads if bh % heads == 0 else bh
    heads = heads if bh % heads == 0 else 1
    ks = node_shape(k_pre)
    kv_len = ks[1] if k_is_t else ks[2]
    form = ("bh", batch, heads)
    return SiteMatch(
        pattern="eager_softmax",
        anchor=anchor,
        output=pv,
        q=q,
        k=k_pre,
        v=v,
        scale=scale * hidden,
        op_scale=scale,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d,
        head_dim_v=vs[-1],
        batch=batch,
        q_len=nq,
        kv_len=kv_len,
        q_form=form,
        k_form=form,
        v_form=form,
        out_form=form,
        k_transposed=not k_is_t,
    )


def _heads_from_layout(x: Any, d: int, ctx: GraphContext) -> int | None:
    """Find ``H`` for a ``(B*H, N, D)`` tensor: the reshape that split ``H*D`` into heads."""
    cur = x
    for _ in range(12):
        cur = strip_identity(cur, ctx.gm)
        op = canon(cur, ctx.gm)
        if op is None or op.kind not in ("reshape", "transpose", "permute", "mul", "div"):
            break
        if op.kind == "reshape":
            split = _lead_regroup(op.input, cur)
            if split:  # (B, H, N, D) -> (B*H, N, D): H is the split's second dim
                return split[1]
            s = node_shape(op.input)
            if s and s[-1] % d == 0 and s[-1] > d:
                return s[-1] // d
        cur = op.input
    return None


def _einsum_match(ctx, anchor, scores: _Scores, qk_op: Op, pv: fx.Node, pv_op: Op) -> SiteMatch | None:
    if qk_op.kind != "einsum" or pv_op.kind != "einsum":
        return _skip(anchor, "mixed einsum/matmul attention is not matched")
    s_out, (qa, ka), (q_in, k_in) = _einsum_parts(qk_op)
    o_out, (pa, va), (_, v_in) = _einsum_parts(pv_op)
    if len(s_out) < 3 or len(qa) != len(ka):
        return _skip(anchor, "einsum scores are not (batch..., q, k)")
    qlet, klet = s_out[-2], s_out[-1]
    batch_letters = s_out[:-2]
    dlet = [c for c in qa if c in ka and c not in s_out]
    if len(dlet) != 1 or qlet not in qa or klet not in ka:
        return _skip(anchor, "einsum does not contract one head dimension")
    # Map the P operand's letters onto the score letters by position.
    ren = dict(zip(pa, s_out))
    va_r = "".join(ren.get(c, c) for c in va)
    o_r = "".join(ren.get(c, c) for c in o_out)
    elet = [c for c in va_r if c not in s_out]
    if len(elet) != 1 or klet not in va_r:
        return _skip(anchor, "einsum P·V does not contract the key dimension")
    d, e = dlet[0], elet[0]
    want_q, want_k, want_v, got_o = (
        batch_letters + qlet + d,
        batch_letters + klet + d,
        batch_letters + klet + e,
        batch_letters + qlet + e,
    )
    if sorted(o_r) != sorted(got_o) or len(batch_letters) not in (1, 2):
        return _skip(anchor, "einsum output layout not understood")
    perm_q = [qa.index(c) for c in want_q]
    perm_k = [ka.index(c) for c in want_k]
    perm_v = [va_r.index(c) for c in want_v]
    perm_o = [got_o.index(c) for c in o_r]
    q, q_scale = fold_scalar_scale(q_in, ctx.gm)
    qs, ks, vs = node_shape(q), node_shape(k_in), node_shape(v_in)
    qb = [qs[i] for i in perm_q]
    kb = [ks[i] for i in perm_k]
    vb = [vs[i] for i in perm_v]
    if len(batch_letters) == 1:
        return _skip(anchor, "single-batch-dim einsum attention is not matched")
    return SiteMatch(
        pattern="eager_softmax",
        anchor=anchor,
        output=pv,
        q=q,
        k=k_in,
        v=v_in,
        scale=scores.scale * q_scale,
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


def _match_mha(ctx: GraphContext, node: fx.Node, op: Op) -> SiteMatch | None:
    from attnopt.patterns.mha import match_mha_functional

    return match_mha_functional(ctx, node, op)


MATCHERS: tuple[Matcher, ...] = (
    Matcher("sdpa", ("sdpa",), match_sdpa),
    Matcher("mha_functional", ("mha_functional",), _match_mha),
    Matcher("sdpa_fused", ("sdpa_fused",), match_sdpa_fused),
    Matcher("eager_softmax", ("softmax",), match_eager_softmax),
)
