"""Banded (sliding-window) softmax attention on the CPU, as a few large batched matmuls.

Queries are cut into chunks of ``C`` rows; chunk ``c`` sees one contiguous run of ``C + W - 1``
keys, so its keys are an ``as_strided`` *view* of ``k`` (no copy). One ``baddbmm`` gives the
scores of every chunk of a head at once, an additive bias (built once per shape, cached) masks
the two partial edges of the band, softmax runs in place, and one ``bmm`` with the matching view
of ``v`` writes the output straight into place. Sink keys, when asked for, are copied in front
of each chunk's band. Rows whose band would start before key 0 (the first ``W`` rows) run as
causal SDPA, and the ragged tail densely over only the keys it can see (they are a small share
of the work). Work items are (batch, key/value head, query heads sharing a window), so
different windows per head run in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnopt.codegen.cpu.pool import MAX_TILE, run_items, scratch
from attnopt.replacements.block_layout import ElementRule

__all__ = ["DEFAULT_CHUNK", "SMALL_WINDOW", "SMALL_WINDOW_CHUNK", "additive_mask", "band_attention"]

#: Query rows per chunk of the band path. Smaller chunks waste fewer masked scores (``C - 1`` of
#: ``C + W - 1`` per row) but give smaller matmuls; see benchmarks/results/cpu_block_sparse.md
#: for the sweep (N=4096, W=512, D=64).
DEFAULT_CHUNK = 64
#: Windows up to this many keys use :data:`SMALL_WINDOW_CHUNK` rows per chunk instead: a chunk
#: computes ``C - 1`` masked scores per row, which is most of the work when the window is small.
#: Measured (B=1, H=4, Hkv=2, N=2048, D=64, sink 4; ratio to causal SDPA): windows [64]*4: C=32
#: 4.75x, C=64 4.21x; [64, 90, 127, 131]: 3.26x vs 3.03x; [222, 129, 125, 228]: 2.49x vs 2.52x.
SMALL_WINDOW = 160
SMALL_WINDOW_CHUNK = 32
_NEG_INF = float("-inf")
_BIASES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _band_bias(chunk: int, window: int, sink: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks of a band chunk's lower edge (cols ``[0, C-1)``) and diagonal (cols ``[W, C+W-1)``).

    Column ``j`` of the band holds key ``p0 - W + 1 + j`` for a chunk whose first query sits at
    absolute position ``p0``; row ``i`` may see it iff ``i <= j <= i + W - 1``.
    """
    key = (chunk, window, sink, dtype)
    if key not in _BIASES:
        i = torch.arange(chunk)[:, None]
        j = torch.arange(chunk + window - 1)[None, :]
        allowed = (j >= i) & (j <= i + window - 1)
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, _NEG_INF)
        _BIASES[key] = (bias[:, : chunk - 1].contiguous(), bias[:, window:].contiguous())
    return _BIASES[key]


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool (True = attend) or additive mask as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, _NEG_INF)
    return mask.to(dtype)


def _rule_allowed(rule: ElementRule, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Element rule (one window) on absolute positions, broadcasting ``qpos`` against ``kpos``."""
    allowed = torch.ones(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool, device=qpos.device)
    if rule.causal:
        allowed &= kpos <= qpos
    if rule.window is not None:
        near = kpos > qpos - rule.window[0]
        if rule.sink:
            near |= kpos < rule.sink
        allowed &= near
    return allowed


def _dense_rows(qh, kh, vh, mh, *, scale, rows, offset, window, sink) -> torch.Tensor:
    """Masked attention of query rows ``rows`` of one item's heads over only the keys they can see.

    ``qh``: ``(G, Nq, D)`` heads sharing the key/value head ``kh`` ``(Nk, D)`` / ``vh`` ``(Nk, Dv)``;
    ``mh``: their extra additive mask ``(G, Nq, Nk)`` or None. Keys visited are the sinks plus the
    run from the first row's window start to the last row's position, so the band's head rows,
    ragged tail and short sequences cost ``rows x (window + rows)``, not ``rows x Nk``.
    Returns ``(G, rows, Dv)``.
    """
    r0, r1 = rows
    g, d = qh.shape[0], qh.shape[-1]
    nk = kh.shape[0]
    lo, hi = max(0, r0 + offset - window + 1), min(nk, r1 + offset)
    keys = torch.arange(lo, hi, device=qh.device)
    if sink and lo > 0:
        keys = torch.cat([torch.arange(min(sink, lo), device=qh.device), keys])
        ks, vs = kh.index_select(0, keys), vh.index_select(0, keys)
    else:
        ks, vs = kh[lo:hi], vh[lo:hi]
    qpos = torch.arange(r0, r1, device=qh.device)[:, None] + offset
    allowed = _rule_allowed(ElementRule(causal=True, window=(window,), sink=sink), qpos, keys[None, :])
    bias = torch.zeros(allowed.shape, dtype=qh.dtype, device=qh.device).masked_fill_(~allowed, _NEG_INF)
    s = torch.mm(qh[:, r0:r1].reshape(g * (r1 - r0), d), ks.t()).mul_(scale).view(g, r1 - r0, -1).add_(bias)
    if mh is not None:
        s.add_(mh[:, r0:r1].index_select(-1, keys))
    p = torch.softmax(s, dim=-1).view(g * (r1 - r0), -1)
    return torch.mm(p, vs).view(g, r1 - r0, vs.shape[-1])


def _as_windows(window: int | Sequence[int], heads: int) -> list[int]:
    """One window per query head (an int applies to all of them)."""
    windows = [int(window)] * heads if isinstance(window, int) else [int(w) for w in window]
    if len(windows) != heads:
        raise ValueError(f"Expected one window per query head ({heads}), but got {len(windows)} windows.")
    return windows


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | Sequence[int],
    sink: int = 0,
    attn_mask: torch.Tensor | None = None,
    chunk: int | None = None,
    out: torch.Tensor | None = None,
    parallel: bool = False,
) -> torch.Tensor:
    """Causal (bottom-right) attention where query ``p`` of head ``h`` sees keys ``(p - window[h], p]`` and keys ``< sink``.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``; GQA when ``Hkv < Hq``.
        window: keys per query counted including the diagonal (``>= 1``): one int for every head,
            or one per query head (heads of one key/value head with equal windows share matmuls).
        sink: leading keys every query sees in addition to its window.
        attn_mask: extra bool/additive mask broadcastable to ``(B, Hq, Nq, Nk)``, applied inside the band.
        chunk: query rows per chunk (``C``); ``None``: :data:`SMALL_WINDOW_CHUNK` for windows up to
            :data:`SMALL_WINDOW`, else :data:`DEFAULT_CHUNK` (both read at call time).
        out: optional contiguous ``(B, Hq, Nq, Dv)`` tensor to write into.

    Returns:
        ``(B, Hq, Nq, Dv)``; equals ``attention_reference`` with the same allowed map.
    """
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = hq // hkv
    windows = _as_windows(window, hq)
    if min(windows) < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"Expected windows >= 1 and chunk >= 1, but got windows={windows}, chunk={chunk}.")
    if out is None or not out.is_contiguous():
        out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    mask = additive_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.expand(b, hq, nq, nk)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    job = _Band(q, k, v, out, mask, scale=scale, sink=min(sink, nk), chunk=chunk, offset=nk - nq)
    items = []
    for bi in range(b):
        for kh in range(hkv):
            same: dict[int, list[int]] = {}
            for h in range(kh * groups, (kh + 1) * groups):
                same.setdefault(min(windows[h], nk), []).append(h)
            items += [(bi, kh, tuple(heads), w) for w, heads in same.items()]
    run_items(items, job.item, parallel=parallel)
    if mask is not None:
        out.nan_to_num_(0.0)  # rows the extra mask empties entirely
    return out


class _Band:
    """One band-attention call, split into items: (batch, key/value head, query heads sharing a window)."""

    def __init__(self, q, k, v, out, mask, *, scale: float, sink: int, chunk: int | None, offset: int):
        self.q, self.k, self.v, self.out, self.mask = q, k, v, out, mask
        self.scale, self.sink, self.chunk, self.offset = scale, sink, chunk, offset

    def item(self, bi: int, kh: int, heads: tuple[int, ...], window: int) -> None:
        """Attention of query heads ``heads`` (all on key/value head ``kh``) of batch ``bi`` with one window."""
        q, out, mask, offset, chunk = self.q, self.out, self.mask, self.offset, self.chunk
        if chunk is None:
            chunk = SMALL_WINDOW_CHUNK if window <= SMALL_WINDOW else DEFAULT_CHUNK
        nq, dv = q.shape[2], self.v.shape[-1]
        h0, g = heads[0], len(heads)
        run = heads == tuple(range(h0, h0 + g))
        index = None if run else torch.tensor(heads, device=q.device)
        qh = q[bi, h0 : h0 + g] if run else q[bi].index_select(0, index)
        res = out[bi, h0 : h0 + g] if run else torch.empty(g, nq, dv, dtype=q.dtype, device=q.device)
        mh = None if mask is None else (mask[bi, h0 : h0 + g] if run else mask[bi].index_select(0, index))
        kh_, vh_ = self.k[bi, kh], self.v[bi, kh]
        rows_kw = dict(scale=self.scale, offset=offset, window=window, sink=self.sink)
        first = max(0, min(nq, window - 1 - offset))  # first row whose band starts at key >= 0
        nchunks = (nq - first) // chunk
        tail = first + nchunks * chunk
        if first and mh is None and offset == 0:
            # Rows before the first full window see every earlier key: plain causal attention, where
            # SDPA's flash kernel skips the upper triangle (half the work of a masked dense block).
            res[:, :first] = torch.nn.functional.scaled_dot_product_attention(
                qh[None, :, :first], kh_[None, None, :first], vh_[None, None, :first],
                is_causal=True, scale=self.scale, enable_gqa=g > 1,
            )[0]  # fmt: skip
        elif first:
            res[:, :first] = _dense_rows(qh, kh_, vh_, mh, rows=(0, first), **rows_kw)
        if tail < nq:
            res[:, tail:] = _dense_rows(qh, kh_, vh_, mh, rows=(tail, nq), **rows_kw)
        if nchunks:
            self._chunks(qh, kh_, vh_, mh, res, window, chunk, first, nchunks)
        if not run:
            out[bi].index_copy_(0, index, res)

    def _chunks(self, qh, kbase, vbase, mh, res, window, chunk, first, nchunks) -> None:
        """The band proper: rows ``[first, first + nchunks * C)``, a few chunks per batched matmul."""
        sink, offset = self.sink, self.offset
        g, d, dv, dtype, device = qh.shape[0], qh.shape[-1], vbase.shape[-1], qh.dtype, qh.device
        lo, hi = _band_bias(chunk, window, sink, dtype)
        band = chunk + window - 1
        rows = g * chunk
        width = band + sink
        step = max(1, min(nchunks, MAX_TILE // (rows * width)))
        sink_bias = _sink_bias(chunk, window, sink, first + offset, nchunks, dtype) if sink else None
        s_buf = scratch("band_s", step * rows * width, dtype, device)
        o_buf = scratch("band_o", step * rows * dv, dtype, device) if g > 1 else None
        if sink:
            kb = scratch("band_k", step * width * d, dtype, device)
            vb = scratch("band_v", step * width * dv, dtype, device)
        qv = qh[:, first : first + nchunks * chunk].reshape(g, nchunks, chunk, d)
        for c0 in range(0, nchunks, step):
            n = min(step, nchunks - c0)
            key0 = first + offset + c0 * chunk - window + 1
            kview = kbase.as_strided((n, band, d), (chunk * d, d, 1), kbase.storage_offset() + key0 * d)
            vview = vbase.as_strided((n, band, dv), (chunk * dv, dv, 1), vbase.storage_offset() + key0 * dv)
            qc = qv[0, c0 : c0 + n] if g == 1 else qv[:, c0 : c0 + n].transpose(0, 1).reshape(n, rows, d)
            s = s_buf[: n * rows * width].view(n, rows, width)
            if sink:
                kcat = kb[: n * width * d].view(n, width, d)
                kcat[:, :sink] = kbase[:sink]
                kcat[:, sink:] = kview
                vcat = vb[: n * width * dv].view(n, width, dv)
                vcat[:, :sink] = vbase[:sink]
                vcat[:, sink:] = vview
                kview, vview = kcat, vcat
            torch.baddbmm(s, qc, kview.transpose(-1, -2), beta=0.0, alpha=self.scale, out=s)
            sb = s[:, :, sink:].view(n, g, chunk, band)
            if chunk > 1:
                sb[..., : chunk - 1].add_(lo)
            sb[..., window:].add_(hi)
            if sink:
                s[:, :, :sink].view(n, g, chunk, sink).add_(sink_bias[c0 : c0 + n, None])
            row0 = first + c0 * chunk
            if mh is not None:
                _add_band_mask(s, mh, row0, key0, n, chunk, band, sink)
            torch.ops.aten._softmax.out(s, -1, False, out=s)
            dst = res[:, row0 : row0 + n * chunk].view(g, n, chunk, dv)
            if g == 1:
                torch.bmm(s, vview, out=dst[0])
            else:
                o = o_buf[: n * rows * dv].view(n, rows, dv)
                torch.bmm(s, vview, out=o)
                dst.copy_(o.view(n, g, chunk, dv).transpose(0, 1))


def _sink_bias(chunk: int, window: int, sink: int, pos0: int, nchunks: int, dtype) -> torch.Tensor:
    """``(nchunks, C, sink)`` bias: a sink key counts only where the window does not already hold it."""
    key = ("sink", chunk, window, sink, pos0, nchunks, dtype)
    if key not in _BIASES:
        p = pos0 + torch.arange(nchunks * chunk).view(nchunks, chunk, 1)
        j = torch.arange(sink).view(1, 1, sink)
        bias = torch.zeros(nchunks, chunk, sink, dtype=dtype).masked_fill_(j >= p - window + 1, _NEG_INF)
        _BIASES[key] = (bias, bias)
    return _BIASES[key][0]


def _add_band_mask(s, mh, row0, key0, n, chunk, band, extra) -> None:
    """Add the extra mask's band entries (``mh``: ``(G, Nq, Nk)``) to the score tile, as strided views (no gather)."""
    g = mh.shape[0]
    for gi in range(g):
        m = mh[gi]
        sr, sc = m.stride()
        view = m.as_strided(
            (n, chunk, band), (chunk * (sr + sc), sr, sc), m.storage_offset() + row0 * sr + key0 * sc
        )
        s[:, :, extra:].view(n, g, chunk, band)[:, gi].add_(view)
        if extra:
            sview = m.as_strided((n, chunk, extra), (chunk * sr, sr, sc), m.storage_offset() + row0 * sr)
            s[:, :, :extra].view(n, g, chunk, extra)[:, gi].add_(sview)
