"""Matchers for SDPA calls: ``F.scaled_dot_product_attention`` and the fused ops it lowers to.

* ``sdpa`` — ``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention``.
* ``sdpa_fused`` — the backend-specific ``aten._scaled_dot_product_*`` ops.

The call already names q, k, v, the mask and the scale, so matching only reads its arguments
(by position or keyword), folds a ``repeat_kv`` on k/v back into GQA head counts and resolves
a scale the graph computes. SDPA's own causal flag is top-left aligned.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from attnopt.patterns.canon import Op, node_shape
from attnopt.patterns.context import GraphContext
from attnopt.patterns.matchutil import const_scalar, is_bool, op_arg, prescale, skip
from attnopt.patterns.records import MaskTerm, SiteMatch
from attnopt.patterns.walk import fold_repeat_kv

__all__ = ["match_sdpa", "match_sdpa_fused"]


def _qkv_facts(q: Any, k: Any, v: Any) -> tuple | None:
    qs, ks, vs = node_shape(q), node_shape(k), node_shape(v)
    if not qs or not ks or not vs or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    return qs, ks, vs


def match_sdpa(ctx: GraphContext, node: fx.Node, op: Op) -> SiteMatch | None:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``."""
    q, k, v = op.args[:3]
    mask = op_arg(op, 3, "attn_mask")
    dropout = op_arg(op, 4, "dropout_p", 0.0) or 0.0
    is_causal = op_arg(op, 5, "is_causal", False)
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
    mask = op.kwargs.get("attn_mask") if mask_i is None else op_arg(op, mask_i, "attn_bias")
    dropout = op_arg(op, drop_i, "dropout_p", 0.0) or 0.0
    is_causal = op_arg(op, causal_i, "is_causal", False)
    scale = op.kwargs.get("scale")
    outs = [u for u in node.users if u.target.__name__ == "getitem"] if node.users else []
    out0 = [u for u in outs if u.args[1] == 0]
    if len(out0) != 1:
        return skip(node, "fused SDPA output 0 is not used")
    m = _sdpa_site("sdpa_fused", ctx, node, out0[0], q, k, v, mask, dropout, is_causal, scale)
    if m is not None and any(u.args[1] != 0 and u.users for u in outs):
        m.unsupported = "the fused SDPA's log-sum-exp output is used by the model"
    return m


def _sdpa_site(pattern, ctx, anchor, output, q, k, v, mask, dropout, is_causal, scale) -> SiteMatch | None:
    if isinstance(is_causal, fx.Node) or isinstance(dropout, fx.Node):
        return skip(anchor, "SDPA's is_causal/dropout_p are computed in the graph")
    dropout, is_causal = float(dropout), bool(is_causal)
    k_base, rep_k = fold_repeat_kv(k, ctx.gm)
    v_base, rep_v = fold_repeat_kv(v, ctx.gm)
    if rep_k != rep_v:
        k_base, v_base, rep_k = k, v, 1
    facts = _qkv_facts(q, k_base, v_base)
    if facts is None:
        return skip(anchor, "SDPA inputs are not 4-D with known shapes")
    qs, ks, vs = facts
    d = qs[-1]
    unresolved = None
    if isinstance(scale, fx.Node):  # computed in the graph (e.g. under dynamic shapes)
        value = const_scalar(scale, ctx)
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
        scale=op_scale * prescale(q, ctx) * prescale(k_base, ctx),
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
        m.mask_terms.append(MaskTerm(mask, "keep" if is_bool(mask) else "add"))
    if unresolved:
        m.unsupported = unresolved
    elif dropout > 0:
        m.unsupported = f"attention dropout p={dropout} is active (training mode); call model.eval() first"
    return m
