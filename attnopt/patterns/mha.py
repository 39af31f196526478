"""Matcher for ``F.multi_head_attention_forward`` kept whole in a graph (dynamo does this).

torch.export inlines ``nn.MultiheadAttention`` into projections + SDPA (found by the ``sdpa``
matcher); dynamo keeps the functional call as one node. This matcher reads the call's bound
arguments — sequence-first ``(L, N, E)`` inputs, ``num_heads``, masks in MHA's convention
(bool True = *masked*) — into the same :class:`SiteMatch` as every other form.
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx
import torch.nn.functional as F

from attnopt.patterns.canon import Op, node_shape
from attnopt.patterns.context import GraphContext
from attnopt.patterns.matchutil import is_bool
from attnopt.patterns.records import MaskTerm, SiteMatch

__all__ = ["match_mha_functional", "MHA_SIGNATURE"]

MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def match_mha_functional(ctx: GraphContext, node: fx.Node, op: Op) -> SiteMatch | None:
    """``multi_head_attention_forward(query, key, value, ..., num_heads, ...)`` as one call."""
    try:
        bound = MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    a = {**{k: p.default for k, p in MHA_SIGNATURE.parameters.items()}, **bound.arguments}
    qs, ks = node_shape(a["query"]), node_shape(a["key"])
    if not qs or not ks:
        return None
    if len(qs) == 2:  # unbatched (L, E)
        qs, ks = (qs[0], 1, qs[1]), (ks[0], 1, ks[1])
    heads = int(a["num_heads"])
    e = qs[-1]
    out0 = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(out0) != 1 or heads <= 0 or e % heads:
        return None
    d = e // heads
    m = SiteMatch(
        pattern="mha_functional",
        anchor=node,
        output=out0[0],
        q=a["query"],
        k=a["key"],
        v=a["value"],
        scale=d**-0.5,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d,
        head_dim_v=d,
        batch=qs[1],
        q_len=qs[0],
        kv_len=ks[0],
        is_causal=bool(a["is_causal"]) and a["key_padding_mask"] is None,
        causal_align="top_left",
        q_form="mha",
        k_form="mha",
        v_form="mha",
        out_form="mha",
    )
    if isinstance(a["attn_mask"], fx.Node) and not m.is_causal:
        m.mask_terms.append(MaskTerm(a["attn_mask"], "drop" if is_bool(a["attn_mask"]) else "add"))
    if isinstance(a["key_padding_mask"], fx.Node):
        m.mask_terms.append(
            MaskTerm(a["key_padding_mask"], "drop_keys" if is_bool(a["key_padding_mask"]) else "add_keys")
        )
    weights_used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    if a["need_weights"] and weights_used:
        m.unsupported = "attention weights are returned (need_weights=True); call with need_weights=False"
    elif a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        m.unsupported = "bias_k/bias_v/add_zero_attn are not supported"
    elif a["training"] and float(a["dropout_p"] or 0) > 0:
        m.unsupported = (
            f"attention dropout p={a['dropout_p']} is active (training mode); call model.eval() first"
        )
    m.internal = {node}
    return m
