"""Shared-score attention: one softmax P per head cluster, applied to every member head's V.

Semantics (CHAI-style sharing): heads are partitioned into clusters by ``cluster_of_head``
``(H,)``; cluster ``c`` has a representative query head ``r = representatives[c]``. Every member
``h`` of ``c`` outputs ``softmax(q_r k_{kv(r)}ᵀ · scale, masked) · v_{kv(h)}``, with
``kv(h) = h // (Hq // Hkv)``. The scores are computed once per cluster and query block.

Kernel: grid ``(cdiv(Nq, BLOCK_M), B * C * chunks)``. A program owns one query block of one
cluster and up to ``MEMBERS`` member heads (a *chunk*; clusters larger than ``MEMBERS`` get
several chunks, each recomputing the shared scores). Its accumulator is 3-D
``(MEMBERS, BLOCK_M, BLOCK_DV)``: each key tile's P is broadcast over members and multiplied by
the members' V tiles in one batched ``tl.dot``, so P never leaves registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.codegen.memo import BoundedCache
from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.codegen.triton import source
from attnopt.codegen.triton._common import (
    LOG2E,
    autotune_configs,
    cdiv,
    default_scale,
    dense_tile_bounds,
    head_block,
    make_out,
    portable_fallback,
    structural_allowed,
    validate_qkv,
)

__all__ = ["member_table", "shared_attention", "shared_kernel"]

_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (4, 3))]
)


@triton.jit
def _shared_tile(
    acc, l_i, m_i, q, K_bh, V_b, v_heads, member_ok,
    stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
    start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale,
    MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """One key tile: representative scores once, then P·V for every member in a batched dot."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_t = tl.load(K_bh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=(offs_d[:, None] < HEAD_DIM) & (offs_n[None, :] < Nk), other=0.0)  # fmt: skip
    qk = tl.dot(q, k_t) * qk_scale
    if MASK:
        allowed = (offs_n[None, :] < Nk) & structural_allowed(offs_pos, offs_n, WINDOW, CAUSAL, WINDOW > 0, 0)
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = V_b + v_heads[:, None, None] * stride_vh + offs_n[None, :, None] * stride_vn
    v_ptrs = v_ptrs + offs_dv[None, None, :] * stride_vd
    v_mask = member_ok[:, None, None] & (offs_n[None, :, None] < Nk) & (offs_dv[None, None, :] < HEAD_DIM_V)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    p3 = tl.broadcast_to(p.to(v.dtype)[None, :, :], (MEMBERS, BLOCK_M, BLOCK_N))
    acc = acc * alpha[None, :, None] + tl.dot(p3, v)
    return acc, l_i, m_new


@triton.autotune(configs=_CONFIGS, key=["Nq", "Nk", "HEAD_DIM", "MEMBERS", "CAUSAL", "WINDOW"])
@triton.jit
def _shared_fwd(
    Q, K, V, Out, REPS, TABLE,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_tc,
    Nq, Nk, C, CHUNKS,
    GROUP: tl.constexpr, MEMBERS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Nq, BLOCK_M), B * C * CHUNKS)``; ``TABLE[c, chunk * MEMBERS + i]`` = member head or -1."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // (C * CHUNKS)
    c = (pid // CHUNKS) % C
    chunk = pid % CHUNKS
    rep = tl.load(REPS + c)
    heads = tl.load(TABLE + c * stride_tc + chunk * MEMBERS + tl.arange(0, MEMBERS))
    member_ok = heads >= 0
    v_heads = tl.where(member_ok, heads, 0) // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_pos = offs_m + (Nk - Nq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + rep * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    K_bh = K + b * stride_kb + (rep // GROUP) * stride_kh
    V_b = V + b * stride_vb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([MEMBERS, BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = dense_tile_bounds(start_m, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _shared_tile(
            acc, l_i, m_i, q, K_bh, V_b, v_heads, member_ok, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale,
            MEMBERS, BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, CAUSAL, WINDOW,
        )  # fmt: skip
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _shared_tile(
            acc, l_i, m_i, q, K_bh, V_b, v_heads, member_ok, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale,
            MEMBERS, BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, False, CAUSAL, WINDOW,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _shared_tile(
            acc, l_i, m_i, q, K_bh, V_b, v_heads, member_ok, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale,
            MEMBERS, BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, CAUSAL, WINDOW,
        )  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[None, :, None]
    o_ptrs = Out + b * stride_ob + tl.where(member_ok, heads, 0)[:, None, None] * stride_oh
    o_ptrs = o_ptrs + offs_m[None, :, None] * stride_on + offs_dv[None, None, :] * stride_od
    o_mask = member_ok[:, None, None] & (offs_m[None, :, None] < Nq) & (offs_dv[None, None, :] < HEAD_DIM_V)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


_TABLES: BoundedCache[tuple, tuple] = BoundedCache("triton.shared_tables", 256)


def member_table(
    cluster_of_head: torch.Tensor,
    representatives: torch.Tensor,
    members: int | None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(reps int32 (C,), table int32 (C, chunks * members), chunks, members)``; the table lists
    each cluster's heads, padded with -1; both on ``device`` (default: ``cluster_of_head``'s).
    ``members=None`` picks the largest cluster's size rounded up to a power of two, capped at 4.

    Cached per parameter tensors (a site's params are fixed), so the host sync of building it
    happens once, not every call. The cache holds the tensors themselves, so their storage
    cannot be reused by another tensor while the entry lives; ``_version`` catches in-place edits.
    """
    dev = torch.device(device) if device is not None else cluster_of_head.device
    key = (
        id(cluster_of_head),
        cluster_of_head._version,
        id(representatives),
        representatives._version,
        members,
        dev,
    )
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is cluster_of_head and hit[1] is representatives:
        return hit[2], hit[3], hit[4], hit[5]
    coh = cluster_of_head.long().cpu()
    reps = representatives.long().cpu()
    num_c = reps.numel()
    if coh.dim() != 1 or reps.dim() != 1 or num_c == 0:
        raise ValueError(
            f"Expected cluster_of_head (H,) and representatives (C,) with C >= 1, but got shapes "
            f"{tuple(coh.shape)} and {tuple(reps.shape)}."
        )
    if int(coh.min()) < 0 or int(coh.max()) >= num_c:
        raise ValueError(
            f"Expected cluster ids in [0, {num_c}), but got {coh.tolist()}. Renumber the clusters."
        )
    if int(reps.min()) < 0 or int(reps.max()) >= coh.numel():
        raise ValueError(f"Expected representative heads in [0, {coh.numel()}), but got {reps.tolist()}.")
    groups = [torch.nonzero(coh == c).flatten().tolist() for c in range(num_c)]
    if members is None:
        members = min(4, triton.next_power_of_2(max(len(g) for g in groups)))
    if members < 1 or members & (members - 1):
        raise ValueError(f"Expected members a power of two, but got {members}.")
    chunks = max(1, max(cdiv(len(g), members) for g in groups))
    table = torch.full((num_c, chunks * members), -1, dtype=torch.int32)
    for c, g in enumerate(groups):
        table[c, : len(g)] = torch.tensor(g, dtype=torch.int32)
    reps_dev, table_dev = reps.to(torch.int32).to(dev), table.to(dev)
    _TABLES[key] = (cluster_of_head, representatives, reps_dev, table_dev, chunks, members)
    return reps_dev, table_dev, chunks, members


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cluster_of_head: torch.Tensor,
    representatives: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
    members: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shared-score attention (module docstring).

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)``.
        cluster_of_head: int64 ``(Hq,)`` cluster id of every query head.
        representatives: int64 ``(C,)`` query head whose scores cluster ``c`` uses.
        scale, causal, window: as in exact attention (bottom-right causal).
        members: member heads per program (power of two); default: the largest cluster, capped at 4.
        block_m, block_n: tile sizes (powers of two >= 16).
        out: optional preallocated output.

    Returns:
        ``(B, Hq, Nq, Dv)`` in v's dtype.
    """
    dims = validate_qkv(q, k, v, where="shared_attention")
    if cluster_of_head.numel() != dims.heads:
        raise ValueError(
            f"shared_attention: expected cluster_of_head with one entry per query head ({dims.heads}), "
            f"but got {cluster_of_head.numel()}."
        )
    for name, tile in (("block_m", block_m), ("block_n", block_n)):
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"shared_attention: expected {name} a power of two >= 16, but got {tile}.")
    reps, table, chunks, members = member_table(cluster_of_head, representatives, members, q.device)
    scale = default_scale(scale, dims.head_dim)
    out = make_out(q, v, out, dims, where="shared_attention")
    constexprs = dict(
        GROUP=dims.group, MEMBERS=members, HEAD_DIM=dims.head_dim, HEAD_DIM_V=dims.head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(dims.head_dim), BLOCK_DV=head_block(dims.head_dim_v),
        CAUSAL=bool(causal), WINDOW=int(window or 0),
    )  # fmt: skip
    source.record_launch(_shared_fwd, constexprs)
    grid = (cdiv(dims.q_len, block_m), dims.batch * reps.numel() * chunks)
    _shared_fwd[grid](
        q, k, v, out, reps, table, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), table.stride(0),
        dims.q_len, dims.kv_len, reps.numel(), chunks,
        **constexprs,
    )  # fmt: skip
    return out


_CONFIG_PARAMS: BoundedCache[tuple[str, int], tuple[torch.Tensor, ...]] = BoundedCache(
    "triton.shared_params", 256
)


@register_kernel("shared", "cuda")
def shared_kernel(call: AttentionCall) -> torch.Tensor:
    """``attnopt::shared`` on CUDA: ``params = [cluster_of_head (H,), representatives (C,)]`` (int64),
    or, when the op carries no params, the clusters of :class:`attnopt.replacements.shared.SharedConfig`.
    """
    if call.attn_mask is not None:
        return portable_fallback("shared", call, "a model mask tensor")
    if len(call.params) >= 2:
        cluster_of_head, representatives = call.params[0], call.params[1]
    else:
        from attnopt.replacements.shared import SharedConfig, shared_params

        cfg = call.family_config(SharedConfig)
        key = (cfg.key(), call.q.shape[1])
        pair = _CONFIG_PARAMS.get(key)
        if pair is None:  # keep one tensor pair per config, so member_table's cache hits
            pair = _CONFIG_PARAMS[key] = tuple(shared_params(cfg, call.q.shape[1]))
        cluster_of_head, representatives = pair
    return shared_attention(
        call.q, call.k, call.v, cluster_of_head, representatives, scale=call.scale, causal=call.causal,
        window=call.window,
    )  # fmt: skip
