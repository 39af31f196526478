"""Block-sparse flash attention over FlexAttention-style block lists (optionally with INT8/FP8 Q·Kᵀ).

Layout (the one FlexAttention's ``BlockMask`` uses, and :class:`attnopt.replacements.block_layout.BlockLayout`
holds): for batch ``b``, head ``h`` and query block ``m`` (``q_block`` rows),

* ``kv_num_blocks[b, h, m]`` / ``kv_indices[b, h, m, :]``: key blocks (``kv_block`` keys) that
  need the element mask (causal / window / sink rule, see :mod:`._common`);
* ``full_kv_num_blocks`` / ``full_kv_indices``: key blocks every query of the block sees in
  full, computed without any mask (the fast path). Optional.

The B and H dimensions of every layout tensor may be 1 and are broadcast (stride 0), so a
static per-model pattern costs no memory per batch. A row's attention is the softmax over the
union of its listed blocks (partial ones filtered by the rule); rows that see no key give 0.

The kernel walks the lists in order: partial blocks then full blocks, each split into
``BLOCK_N``-key tiles. With ``qk_format="int8"`` (or ``"fp8"``) it is the sparse+quantized kernel:
the same walk with the smoothed, per-block quantized Q·Kᵀ of :mod:`.quantized`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnopt.codegen.memo import BoundedCache
from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.codegen.triton import source
from attnopt.codegen.triton._common import (
    LOG2E,
    attn_tile,
    autotune_configs,
    cdiv,
    default_scale,
    finish_rows,
    head_block,
    load_q,
    make_out,
    portable_fallback,
    qk_mode,
    validate_qkv,
)
from attnopt.codegen.triton.quantized import kernel_view, prepare_quantized_qk

__all__ = [
    "block_sparse_attention",
    "block_sparse_kernel",
    "layout_allowed",
    "structural_layout",
    "layout_from_block_layout",
]


def _prune_configs(configs, named_args, **kwargs):  # noqa: ANN001, ANN003
    """Drop configs whose warps overfill a small tile (autotune's ``prune_configs_by`` hook)."""
    small = kwargs.get("BLOCK_M", 128) * kwargs.get("BLOCK_N", 64) <= 32 * 32
    kept = [c for c in configs if not (small and c.num_warps > 4)]
    return kept or configs[:1]


_CONFIGS = autotune_configs(
    [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 3), (8, 3), (4, 2), (8, 2))]
)


@triton.autotune(
    configs=_CONFIGS,
    key=["Nq", "Nk", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "QK_MODE", "CAUSAL", "WINDOW"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, QS, KS,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, WINDOWS,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_qsb, stride_qsh, stride_qsm,
    stride_ksb, stride_ksh, stride_ksn,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_fnb, stride_fnh, stride_fnm,
    stride_fib, stride_fih, stride_fim, stride_fik,
    Hq, Nq, Nk,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPARSE_Q_BLOCK: tl.constexpr, SPARSE_KV_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HEAD_WINDOWS: tl.constexpr, SINK: tl.constexpr,
    QK_MODE: tl.constexpr, HAS_FULL: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(Nq, BLOCK_M), B * Hq)``: one query block of one head per program."""
    tl.static_assert(SPARSE_Q_BLOCK % BLOCK_M == 0)
    tl.static_assert(SPARSE_KV_BLOCK % BLOCK_N == 0)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // Hq
    h = off_bh % Hq
    hkv = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_pos = offs_m + (Nk - Nq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_q(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, Nq, HEAD_DIM, QK_MODE)
    q_scale = 1.0
    if QK_MODE != 0:
        q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + start_m * stride_qsm)
    K_bh = K + b * stride_kb + hkv * stride_kh
    V_bh = V + b * stride_vb + hkv * stride_vh
    KS_bh = KS + b * stride_ksb + hkv * stride_ksh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    sparse_m = (start_m * BLOCK_M) // SPARSE_Q_BLOCK
    if HEAD_WINDOWS:
        window = tl.load(WINDOWS + h)
    else:
        window = WINDOW

    num = tl.load(KV_NUM + b * stride_nb + h * stride_nh + sparse_m * stride_nm)
    idx_ptr = KV_IDX + b * stride_ib + h * stride_ih + sparse_m * stride_im
    for i in range(num):
        block = tl.load(idx_ptr + i * stride_ik)
        for sub in tl.static_range(SPARSE_KV_BLOCK // BLOCK_N):
            start_n = block * SPARSE_KV_BLOCK + sub * BLOCK_N
            acc, l_i, m_i = attn_tile(
                acc, l_i, m_i, q, q_scale, K_bh, V_bh, KS_bh,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
                start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale, window,
                BLOCK_N, HEAD_DIM, HEAD_DIM_V, True, True, CAUSAL, HEAD_WINDOWS or WINDOW > 0, SINK, QK_MODE,
            )  # fmt: skip
    if HAS_FULL:
        num = tl.load(FULL_NUM + b * stride_fnb + h * stride_fnh + sparse_m * stride_fnm)
        idx_ptr = FULL_IDX + b * stride_fib + h * stride_fih + sparse_m * stride_fim
        for i in range(num):
            block = tl.load(idx_ptr + i * stride_fik)
            for sub in tl.static_range(SPARSE_KV_BLOCK // BLOCK_N):
                start_n = block * SPARSE_KV_BLOCK + sub * BLOCK_N
                acc, l_i, m_i = attn_tile(
                    acc, l_i, m_i, q, q_scale, K_bh, V_bh, KS_bh,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
                    start_n, offs_pos, offs_d, offs_dv, Nk, qk_scale, window,
                    BLOCK_N, HEAD_DIM, HEAD_DIM_V, False, not EVEN_N, CAUSAL, HEAD_WINDOWS or WINDOW > 0, SINK,
                    QK_MODE,
                )  # fmt: skip
    out = finish_rows(acc, l_i)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(
        o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < HEAD_DIM_V)
    )


def _windows(window, heads: int, device: torch.device) -> tuple[int, torch.Tensor | None]:  # noqa: ANN001
    """``(WINDOW constexpr, per-head int32 tensor or None)`` from an int, a sequence or a tensor."""
    if window is None:
        return 0, None
    if isinstance(window, int):
        values = [window]
    else:
        values = [int(w) for w in (window.tolist() if isinstance(window, torch.Tensor) else window)]
    if not values or min(values) < 1 or len(values) not in (1, heads):
        raise ValueError(
            f"block_sparse_attention: expected window >= 1, as one int or one per query head ({heads}), "
            f"but got {values}."
        )
    if len(values) == 1 or len(set(values)) == 1:
        return values[0], None
    return 0, torch.tensor(values, dtype=torch.int32, device=device)


def _layout_tensor(t: torch.Tensor, name: str, rank: int, batch: int, heads: int, mq: int) -> torch.Tensor:
    """Check one layout tensor and broadcast its B/H dims (stride 0, no copy)."""
    if not isinstance(t, torch.Tensor) or t.dim() != rank or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"block_sparse_attention: expected {name} as an int32 tensor of rank {rank}, but got "
            f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}."
        )
    if t.shape[0] not in (1, batch) or t.shape[1] not in (1, heads) or t.shape[2] < mq:
        raise ValueError(
            f"block_sparse_attention: expected {name} with dims (1|{batch}, 1|{heads}, >={mq}, ...), but got "
            f"shape {tuple(t.shape)}. Build the layout for this batch, head count and query length."
        )
    return t.expand(batch, heads, *t.shape[2:])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None = None,
    full_kv_indices: torch.Tensor | None = None,
    *,
    q_block: int = 128,
    kv_block: int = 128,
    scale: float | None = None,
    causal: bool = False,
    window: int | Sequence[int] | torch.Tensor | None = None,
    sink: int = 0,
    qk_format: str = "native",
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention over a FlexAttention-style layout (see the module docstring).

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)``; fp16/bf16/fp32.
        kv_num_blocks, kv_indices: int32 ``(B|1, Hq|1, Mq)`` / ``(B|1, Hq|1, Mq, Mk)``: partial blocks.
        full_kv_num_blocks, full_kv_indices: the same for blocks computed without a mask, or None.
        q_block, kv_block: the layout's block sizes (rows per query block, keys per key block).
        scale: softmax scale (``D ** -0.5`` when None).
        causal, window, sink: the element rule applied inside partial blocks; ``window`` is one
            int or one per query head (``BlockLayout``'s per-head windows).
        qk_format: ``"native"``, ``"int8"`` (smoothed, per-block scales) or ``"fp8"`` (sm89+).
        block_m, block_n: kernel tile sizes, dividing ``q_block``/``kv_block`` (default: up to 64).
        out: optional preallocated output ``(B, Hq, Nq, Dv)`` in v's dtype.

    Returns:
        ``(B, Hq, Nq, Dv)`` in v's dtype.

    Raises:
        ValueError / TypeError: on inconsistent shapes, dtypes, block sizes or formats.
    """
    dims = validate_qkv(q, k, v, where="block_sparse_attention")
    qk_mode_ = qk_mode(qk_format, where="block_sparse_attention")
    block_m = block_m or min(q_block, 64)
    block_n = block_n or min(kv_block, 64)
    for name, blk, tile in (("q_block", q_block, block_m), ("kv_block", kv_block, block_n)):
        if tile < 16 or tile & (tile - 1) or blk % tile:
            raise ValueError(
                f"block_sparse_attention: expected a power-of-two tile >= 16 dividing {name}={blk}, but got {tile}."
            )
    mq = cdiv(dims.q_len, q_block)
    num = _layout_tensor(kv_num_blocks, "kv_num_blocks", 3, dims.batch, dims.heads, mq)
    idx = _layout_tensor(kv_indices, "kv_indices", 4, dims.batch, dims.heads, mq)
    has_full = full_kv_num_blocks is not None
    if has_full != (full_kv_indices is not None):
        raise ValueError(
            "block_sparse_attention: expected full_kv_num_blocks and full_kv_indices together, or neither."
        )
    fnum = (
        _layout_tensor(full_kv_num_blocks, "full_kv_num_blocks", 3, dims.batch, dims.heads, mq)
        if has_full
        else num
    )
    fidx = (
        _layout_tensor(full_kv_indices, "full_kv_indices", 4, dims.batch, dims.heads, mq) if has_full else idx
    )
    scale = default_scale(scale, dims.head_dim)
    out = make_out(q, v, out, dims, where="block_sparse_attention")
    scalar_window, windows = _windows(window, dims.heads, q.device)
    q_in, k_in, qs, ks = prepare_quantized_qk(q, k, qk_format, block_m, block_n, scale=scale)
    q_in, k_in = kernel_view(q_in), kernel_view(k_in)
    constexprs = dict(
        GROUP=dims.group, HEAD_DIM=dims.head_dim, HEAD_DIM_V=dims.head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(dims.head_dim, quantized=qk_format != "native"),
        BLOCK_DV=head_block(dims.head_dim_v),
        SPARSE_Q_BLOCK=q_block, SPARSE_KV_BLOCK=kv_block,
        CAUSAL=bool(causal), WINDOW=scalar_window, HEAD_WINDOWS=windows is not None, SINK=int(sink),
        QK_MODE=qk_mode_, HAS_FULL=has_full, EVEN_N=dims.kv_len % block_n == 0,
    )  # fmt: skip
    source.record_launch(_block_sparse_fwd, constexprs)
    grid = (cdiv(dims.q_len, block_m), dims.batch * dims.heads)
    _block_sparse_fwd[grid](
        q_in, k_in, v, out, qs, ks, num, idx, fnum, fidx, windows if windows is not None else num,
        (scale if qk_mode_ == 0 else 1.0) * LOG2E,  # quantized Q already holds the softmax scale
        *q_in.stride(), *k_in.stride(), *v.stride(), *out.stride(),
        *qs.stride(), *ks.stride(),
        *num.stride(), *idx.stride(), *fnum.stride(), *fidx.stride(),
        dims.heads, dims.q_len, dims.kv_len,
        **constexprs,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------
# Layout helpers: build layouts from a rule, and expand a layout to a dense mask (for tests).
# ------------------------------------------------------------------------------------------


def structural_layout(
    q_len: int,
    kv_len: int,
    *,
    q_block: int,
    kv_block: int,
    causal: bool,
    window: int | None = None,
    sink: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (partial, full) block lists of a causal / sliding-window / sink pattern, shape ``(1, 1, ...)``.

    A block is *full* when the rule allows every (query, key) pair of it inside the sequences,
    *partial* when it allows some, and left out when it allows none. Worked out on block corners
    (first/last query position ``ps``/``pe``, first/last key ``ks``/``ke``), so it costs
    ``O(Mq * Mk)``, not ``O(Nq * Nk)``. Returns
    ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)`` (int32).
    """
    mq, mk = cdiv(q_len, q_block), cdiv(kv_len, kv_block)
    off = kv_len - q_len
    ps = (torch.arange(mq, device=device) * q_block + off)[:, None]
    pe = (torch.clamp(torch.arange(1, mq + 1, device=device) * q_block, max=q_len) - 1 + off)[:, None]
    ks = (torch.arange(mk, device=device) * kv_block)[None, :]
    ke = (torch.clamp(torch.arange(1, mk + 1, device=device) * kv_block, max=kv_len) - 1)[None, :]
    if window:
        some = (ks <= pe) & ((ke + window - 1 >= ps) | (ks < sink))
        full = (ke <= ps) & ((ks > pe - window) | (ke < sink))
    elif causal:
        some, full = ks <= pe, ke <= ps
    else:
        some = full = torch.ones(mq, mk, dtype=torch.bool, device=device)
    full = full & some
    return (*_lists(some & ~full), *_lists(full))


def _lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Mq, Mk)`` bool block selection → ``(1, 1, Mq)`` counts and ``(1, 1, Mq, Mk)`` indices (selected first)."""
    mk = sel.shape[1]
    order = torch.argsort((~sel).int() * mk + torch.arange(mk, device=sel.device), dim=1, stable=True)
    return sel.sum(1).int()[None, None], order.int()[None, None]


def layout_allowed(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    *,
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    causal: bool,
    window: int | None = None,
    sink: int = 0,
) -> torch.Tensor:
    """The dense boolean ``(B|1, H|1, Nq, Nk)`` mask a layout means: what the kernel must compute.

    Slow and plain on purpose (computed on the CPU, returned there); tests pass it to
    ``attention_reference``.
    """
    from attnopt.patterns.masks import causal_allowed, window_allowed

    kv_num_blocks, kv_indices = kv_num_blocks.cpu(), kv_indices.cpu()
    if full_kv_num_blocks is not None:
        full_kv_num_blocks, full_kv_indices = full_kv_num_blocks.cpu(), full_kv_indices.cpu()
    if window:
        rule = window_allowed(q_len, kv_len, window)
        if sink:
            rule = rule | (causal_allowed(q_len, kv_len) & (torch.arange(kv_len) < sink))
    elif causal:
        rule = causal_allowed(q_len, kv_len)
    else:
        rule = torch.ones(q_len, kv_len, dtype=torch.bool)
    b, h, mq = kv_num_blocks.shape
    mk = cdiv(kv_len, kv_block)
    block_sel = torch.zeros(b, h, mq, mk, dtype=torch.bool)
    block_full = torch.zeros_like(block_sel)
    for sel, num, idx in (
        (block_sel, kv_num_blocks, kv_indices),
        (block_full, full_kv_num_blocks, full_kv_indices),
    ):
        if num is None:
            continue
        for bi in range(b):
            for hi in range(h):
                for m in range(mq):
                    sel[bi, hi, m, idx[bi, hi, m, : int(num[bi, hi, m])].long()] = True

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(q_block, 2).repeat_interleave(kv_block, 3)[:, :, :q_len, :kv_len]

    return (expand(block_sel) & rule) | expand(block_full)


def layout_from_block_layout(layout) -> dict:  # noqa: ANN001
    """Keyword arguments of :func:`block_sparse_attention` from a ``BlockLayout``-like object.

    Reads the attributes FlexAttention's ``BlockMask`` and attnopt's ``BlockLayout`` share:
    ``kv_num_blocks``, ``kv_indices``, ``full_kv_num_blocks``, ``full_kv_indices``, and the block
    sizes ``q_block``/``kv_block`` (``BLOCK_SIZE`` tuple on a ``BlockMask``).
    """
    if hasattr(layout, "q_block"):
        q_block, kv_block = int(layout.q_block), int(layout.kv_block)
    elif hasattr(layout, "BLOCK_SIZE"):
        q_block, kv_block = (int(x) for x in layout.BLOCK_SIZE)
    else:
        raise TypeError(
            f"Expected a BlockLayout or BlockMask with block sizes, but got {type(layout).__name__}. "
            "Pass the layout tensors to block_sparse_attention directly."
        )
    return dict(
        kv_num_blocks=layout.kv_num_blocks,
        kv_indices=layout.kv_indices,
        full_kv_num_blocks=getattr(layout, "full_kv_num_blocks", None),
        full_kv_indices=getattr(layout, "full_kv_indices", None),
        q_block=q_block,
        kv_block=kv_block,
    )


# ------------------------------------------------------------------------------------------
# attnopt::block_sparse on CUDA
# ------------------------------------------------------------------------------------------

_STATIC_LAYOUTS: BoundedCache[tuple, object] = BoundedCache("triton.static_layouts", 256)


@register_kernel("block_sparse", "cuda")
def block_sparse_kernel(call: AttentionCall) -> torch.Tensor:
    """``attnopt::block_sparse`` on CUDA: the config's layout (cached for static mode), then the kernel.

    Model mask tensors (padding, arbitrary masks) go to the portable kernel.
    """
    from attnopt.replacements.block_sparse import BlockSparseConfig, layout_for

    if call.attn_mask is not None:
        return portable_fallback("block_sparse", call, "a model mask tensor")
    cfg = call.family_config(BlockSparseConfig)
    q, k = call.q, call.k
    key = (cfg.key(), q.shape[1], q.shape[2], k.shape[2], call.window, call.causal, q.device)
    layout = _STATIC_LAYOUTS.get(key) if cfg.mode == "static" else None
    if layout is None:
        layout = layout_for(q, k, cfg, scale=call.scale, causal=call.causal, window=call.window)
        if cfg.mode == "static":
            _STATIC_LAYOUTS[key] = layout
    rule = layout.rule
    if rule.mask is not None:
        return portable_fallback("block_sparse", call, "a layout with an explicit element mask")
    args = {
        name: (t.to(q.device) if isinstance(t, torch.Tensor) else t)
        for name, t in layout_from_block_layout(layout).items()
    }
    return block_sparse_attention(
        q, k, call.v, **args, scale=call.scale, causal=rule.causal,
        window=list(rule.window) if rule.window is not None else None, sink=rule.sink,
    )  # fmt: skip
