"""``F.multi_head_attention_forward`` with its attention computed by an attnopt operator.

Used when a graph keeps the functional MHA call whole (dynamo does): the rewrite retargets
the call to :func:`mha_forward` with the site's family and config as extra keyword arguments.
Inference semantics only (no dropout, no returned weights) — the matcher marks sites that need
more as not rewritable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.codegen.ops import op_for
from attnopt.patterns.masks import as_additive

__all__ = ["mha_forward"]


def _to_keep(mask: torch.Tensor) -> torch.Tensor:
    """MHA masks: bool True = masked; float = additive. attnopt: bool True = attend."""
    return ~mask if mask.dtype == torch.bool else mask


def _combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return as_additive(a, _float_dtype(a)) + as_additive(b, _float_dtype(b))


def _float_dtype(mask: torch.Tensor) -> torch.dtype:
    return torch.float if mask.dtype == torch.bool else mask.dtype


def mha_forward(
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training=True,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    use_separate_proj_weight=False,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
    static_k=None,
    static_v=None,
    average_attn_weights=True,
    is_causal=False,
    *,
    attnopt_family: str = "exact",
    attnopt_config: str = "{}",
    attnopt_params: list | tuple = (),
):  # noqa: ANN001 - mirrors F.multi_head_attention_forward
    """Same outputs as ``F.multi_head_attention_forward`` in inference (weights: None)."""
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    tgt_len, bsz, embed = query.shape
    src_len = key.shape[0]
    head_dim = embed // num_heads
    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = F.linear(key, w_k, b_k).view(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    v = F.linear(value, w_v, b_v).view(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    causal = bool(is_causal) and key_padding_mask is None
    mask = None
    if attn_mask is not None and not causal:
        am = _to_keep(attn_mask)
        mask = am.view(bsz, num_heads, tgt_len, src_len) if am.dim() == 3 else am
    if key_padding_mask is not None:
        mask = _combine(mask, _to_keep(key_padding_mask).view(bsz, 1, 1, src_len))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = op_for(attnopt_family)(q, k, v, mask, list(attnopt_params), head_dim**-0.5, causal, attnopt_config)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return (out.squeeze(1) if unbatched else out), None
