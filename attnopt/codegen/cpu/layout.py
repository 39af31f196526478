"""Block-sparse attention over any :class:`BlockLayout` on the CPU: the block_sparse kernel's layout path.

Dynamic selection, skip-softmax and every other layout a plan can hold run here. Every
(batch, head, query block) row of the layout is flattened and sorted by its number of key
blocks; each tile of rows with similar counts gathers its key/value blocks with one
``index_select``, is scored with one ``baddbmm``, masked by the layout's element rule (only in
partial blocks and the ragged last key block), softmaxed in place and multiplied with the
gathered values. GQA rows index their key/value head; nothing is repeated. Few, large ops are
what a 2-core CPU runs near its peak (the CPU flash kernel on small masked blocks runs at a
fifth of it).
"""

from __future__ import annotations

import torch

from attnopt.codegen.cpu.pool import MAX_TILE, run_items, scratch
from attnopt.patterns.masks import as_additive
from attnopt.replacements.block_layout import BlockLayout

__all__ = ["layout_attention"]

_NEG_INF = float("-inf")


def layout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    parallel: bool = False,
) -> torch.Tensor:
    """Attention over the blocks of ``layout`` (partial and full), equal to ``to_dense()``-masked attention.

    All (batch, head, query block) rows are flattened and sorted by how many key blocks they
    visit; each tile of rows with similar counts gathers its key/value blocks with one
    ``index_select`` and runs one ``baddbmm`` / softmax / ``bmm``. The layout's element rule,
    the ragged end of the keys and ``attn_mask`` are applied to the gathered scores.
    ``parallel`` runs the tiles on :func:`attnopt.codegen.cpu.pool.run_items`'s thread pool.
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = hq // hkv
    qb, kb = layout.q_block, layout.kv_block
    mq, mk = layout.num_q_blocks, layout.num_kv_blocks
    num, idx = layout.union()
    kinds = layout.block_map().expand(b, hq, mq, mk).reshape(-1, mk)
    num = num.expand(b, hq, mq).reshape(-1).long()
    idx = idx.expand(b, hq, mq, mk).reshape(-1, mk).long()
    pad_q, pad_k = mq * qb - nq, mk * kb - nk
    qf = torch.nn.functional.pad(q, (0, 0, 0, pad_q)).reshape(b * hq * mq, qb, d)
    kf = torch.nn.functional.pad(k, (0, 0, 0, pad_k)).reshape(b * hkv * mk, kb, d)
    vf = torch.nn.functional.pad(v, (0, 0, 0, pad_k)).reshape(b * hkv * mk, kb, dv)
    out = torch.zeros(b * hq * mq, qb, dv, dtype=q.dtype, device=q.device)
    mask = as_additive(attn_mask, q.dtype)  # the gathered tiles add it
    if mask is not None:
        mask = torch.nn.functional.pad(mask.expand(b, hq, nq, nk), (0, pad_k, 0, pad_q)).reshape(
            -1, qb, mk, kb
        )
    rule = layout.rule
    explicit = None
    if rule.mask is not None:
        explicit = torch.nn.functional.pad(rule.mask.expand(b, hq, nq, nk), (0, pad_k, 0, pad_q))
        explicit = explicit.reshape(-1, qb, mk, kb)
    rows_all = torch.arange(b * hq * mq, device=q.device)
    head_of = (rows_all // mq) % hq
    kv_row = (rows_all // (mq * hq)) * hkv + head_of // groups  # (b, kv head) of each row
    qpos_of = (rows_all % mq)[:, None] * qb + torch.arange(qb, device=q.device) + (nk - nq)
    windows = None
    if rule.window is not None:
        wt = torch.tensor(rule.window if len(rule.window) > 1 else rule.window * hq, device=q.device)
        windows = wt[head_of]
    order = torch.argsort(num, descending=True, stable=True)
    order = order[num[order] > 0]
    tiles, start = [], 0
    while start < order.numel():
        kmax = int(num[order[start]])
        end = min(order.numel(), start + max(1, MAX_TILE // (qb * kmax * kb)))
        tiles.append((start, end, kmax))
        start = end

    def tile(start: int, end: int, kmax: int) -> None:
        rows = order[start:end]
        t = rows.numel()

        sel = idx[rows, :kmax]  # (T, K) key blocks, ascending; entries past num are padding
        flat = (kv_row[rows, None] * mk + sel).reshape(-1)
        kg = kf.index_select(0, flat).view(t, kmax * kb, d)
        vg = vf.index_select(0, flat).view(t, kmax * kb, dv)
        s = scratch("layout_s", t * qb * kmax * kb, q.dtype, q.device).view(t, qb, kmax * kb)
        torch.baddbmm(s, qf.index_select(0, rows), kg.transpose(-1, -2), beta=0.0, alpha=scale, out=s)
        valid = torch.arange(kmax, device=q.device) < num[rows, None]  # (T, K)
        s4 = s.view(t, qb, kmax, kb)
        if not bool(valid.all()):
            s4.add_(
                torch.zeros(t, 1, kmax, 1, dtype=q.dtype).masked_fill_(~valid.view(t, 1, kmax, 1), _NEG_INF)
            )
        # Only partial blocks (and the ragged last key block) need the element rule.
        need = (torch.gather(kinds[rows], 1, sel) == 1) | ((sel == mk - 1) if pad_k else False)
        ri, ki = (need & valid).nonzero(as_tuple=True)
        if ri.numel():
            sub = s4[ri, :, ki, :]  # (P, qb, kb)
            kpos = (sel[ri, ki, None] * kb + torch.arange(kb, device=q.device))[:, None, :]
            qpos = qpos_of[rows[ri]][:, :, None]
            ok = kpos < nk
            if rule.causal:
                ok = ok & (kpos <= qpos)
            if windows is not None:
                near = kpos > qpos - windows[rows[ri]].view(-1, 1, 1)
                ok = ok & ((near | (kpos < rule.sink)) if rule.sink else near)
            if explicit is not None:
                ok = ok & explicit[rows[ri], :, sel[ri, ki], :]
            s4[ri, :, ki, :] = sub.masked_fill_(~ok, _NEG_INF)
        if mask is not None:
            s.add_(_gather_blocks(mask, rows, sel))
        torch.ops.aten._softmax.out(s, -1, False, out=s)
        out.index_copy_(0, rows, torch.bmm(s, vg))

    run_items(tiles, tile, parallel=parallel)
    out = out.view(b, hq, mq * qb, dv)[:, :, :nq]
    return out.nan_to_num_(0.0)


def _gather_blocks(x: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """``(rows, qb, Mk, kb)`` blocks → ``(T, qb, K*kb)`` for query-block rows ``rows`` and key blocks ``sel``."""
    t, kmax = sel.shape
    g = x.permute(0, 2, 1, 3)[rows[:, None].expand(t, kmax), sel]  # (T, K, qb, kb)
    return g.permute(0, 2, 1, 3).reshape(t, x.shape[1], kmax * x.shape[3])
