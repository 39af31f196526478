"""Banded softmax attention on the CPU: the one implementation every windowed CPU kernel runs.

What it computes (attnopt's conventions, as in :func:`attnopt.replacements.exact.attention_reference`):
query row ``i`` sits at key position ``p = i + Nk - Nq``; with a window ``W`` (one per query
head) it sees the keys ``p - W < j <= p`` and the first ``sink`` keys; without a window it sees
``j <= p`` when causal and every key otherwise. An extra mask (bool = attend, or additive,
broadcastable to ``(B, Hq, Nq, Nk)``) applies on top. The result is

* ``normalize=True``: ``softmax(s) @ v`` over the visible keys (the block_sparse static band,
  the shared family's representative scores);
* ``normalize=False``: ``Σ_j exp(s_ij - m_i) v_j`` with ``m_i`` the row's max over its visible
  keys, unnormalised (the exact window of the hybrid linear kernel, which appends a ones column
  to ``v`` so the same matmul yields the normaliser ``Σ_j exp(s_ij - m_i)``).

Rows that see no key give 0. How, per work item (batch, key/value head, query heads sharing a
window), in a few large batched matmuls, because that is what a 2-core CPU runs near its peak:

* **interior chunks** (windows only): queries are cut into chunks of ``C`` rows; chunk ``c``
  sees one contiguous run of ``C + W - 1`` keys, so its keys are an ``as_strided`` *view* of
  ``k`` (no copy). One ``baddbmm`` scores several chunks at once, an additive bias (built once
  per shape, cached) masks the two partial edges of the band, the softmax runs in place and one
  ``bmm`` with the matching view of ``v`` writes the output straight into place. Sink keys are
  copied in front of each chunk's band.
* **edge rows** (rows whose band would start before key 0, the ragged tail, and every row when
  there is no window): query chunks whose score tile stays within ``max_tile`` elements, each
  over only the run of keys it can see (:func:`visible_keys`; sinks gathered in front), with
  only the two thin edge slices masked (:func:`mask_band_edges`). Nothing ``Nq x Nk`` is built.
  Where the head rows are plain causal attention (no extra mask, ``Nq == Nk``, ``Dv == D``,
  normalised) SDPA's flash kernel runs them instead: it skips the upper triangle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnopt.codegen.cpu.pool import MAX_TILE, run_items, scratch
from attnopt.codegen.memo import BoundedCache
from attnopt.patterns.masks import as_additive

__all__ = [
    "DEFAULT_CHUNK",
    "SMALL_WINDOW",
    "SMALL_WINDOW_CHUNK",
    "band_attention",
    "band_chunk",
    "mask_band_edges",
    "visible_keys",
]

#: Query rows per chunk of the interior path. Smaller chunks waste fewer masked scores (``C - 1``
#: of ``C + W - 1`` per row) but give smaller matmuls; see benchmarks/results/cpu_block_sparse.md
#: for the sweep (N=4096, W=512, D=64).
DEFAULT_CHUNK = 64
#: Windows up to this many keys use :data:`SMALL_WINDOW_CHUNK` rows per chunk instead: a chunk
#: computes ``C - 1`` masked scores per row, which is most of the work when the window is small.
#: Measured (B=1, H=4, Hkv=2, N=2048, D=64, sink 4; ratio to causal SDPA): windows [64]*4: C=32
#: 4.75x, C=64 4.21x; [64, 90, 127, 131]: 3.26x vs 3.03x; [222, 129, 125, 228]: 2.49x vs 2.52x.
SMALL_WINDOW = 160
SMALL_WINDOW_CHUNK = 32

_NEG_INF = float("-inf")
#: Band and sink biases by chunk, window, sink, (position, chunks) and dtype: a few KB each.
_BIASES: BoundedCache[tuple, tuple[torch.Tensor, torch.Tensor]] = BoundedCache("cpu.band_biases", 256)


def band_chunk(window: int) -> int:
    """Query rows per interior chunk for ``window`` (the module's knobs, read at call time)."""
    return SMALL_WINDOW_CHUNK if window <= SMALL_WINDOW else DEFAULT_CHUNK


def _apply_mask(scores: torch.Tensor, tile: torch.Tensor) -> None:
    """Apply an extra mask tile in place: bool (True = attend) hides with -inf, a float mask is added.

    Bool masks stay bool until a tile of them is used, so a per-head ``(B, H, Nq, Nk)`` bool mask
    never becomes an ``Nq x Nk`` float copy.
    """
    if tile.dtype == torch.bool:
        scores.masked_fill_(~tile, _NEG_INF)
    else:
        scores.add_(tile)


def visible_keys(
    start: int, stop: int, offset: int, kv_len: int, *, causal: bool, window: int | None
) -> tuple[int, int]:
    """The run ``[lo, hi)`` of keys that any query row in ``[start, stop)`` may see (sinks aside).

    ``offset = Nk - Nq`` (bottom-right alignment); a window implies causality. ``hi <= lo``
    means no row of the chunk sees a key.
    """
    hi = max(0, min(kv_len, stop + offset)) if causal or window else kv_len
    lo = max(0, start + offset - window + 1) if window else 0
    return lo, hi


def mask_band_edges(
    scores: torch.Tensor,
    start: int,
    stop: int,
    k_lo: int,
    k_hi: int,
    offset: int,
    window: int | None,
    sink: int = 0,
) -> None:
    """Set the causally hidden (and out-of-window) pairs of a chunk's ``[k_lo, k_hi)`` score tile to -inf.

    ``scores`` is ``(..., stop - start, k_hi - k_lo)``, modified in place. Only the columns right
    of the chunk's first diagonal (``j > start + offset``) can be hidden by causality, and only
    those left of its last window start by the window, so only those two thin slices are touched.
    Keys ``j < sink`` are never hidden by the window (attention sinks), only by causality.
    """
    i = torch.arange(start, stop, device=scores.device)[:, None] + offset
    diag = max(k_lo, start + offset + 1)
    if diag < k_hi:
        j = torch.arange(diag, k_hi, device=scores.device)[None, :]
        scores[..., diag - k_lo :].masked_fill_(j > i, _NEG_INF)
    if window:
        left = max(k_lo, sink)
        edge = min(k_hi, stop - 1 + offset - window + 1)
        if edge > left:
            j = torch.arange(left, edge, device=scores.device)[None, :]
            scores[..., left - k_lo : edge - k_lo].masked_fill_(j <= i - window, _NEG_INF)


def _as_windows(window: int | Sequence[int] | None, heads: int) -> list[int | None]:
    """One window per query head (an int or None applies to all of them)."""
    if window is None or isinstance(window, int):
        windows = [None if window is None else int(window)] * heads
    else:
        windows = [int(w) for w in window]
    if len(windows) != heads:
        raise ValueError(f"Expected one window per query head ({heads}), but got {len(windows)} windows.")
    return windows


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | Sequence[int] | None,
    causal: bool = True,
    sink: int = 0,
    attn_mask: torch.Tensor | None = None,
    chunk: int | None = None,
    max_tile: int = MAX_TILE,
    normalize: bool = True,
    out: torch.Tensor | None = None,
    parallel: bool = False,
) -> torch.Tensor:
    """Banded softmax attention (module docstring): query ``p`` of head ``h`` sees keys ``(p - window[h], p]`` and keys ``< sink``.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``; GQA when ``Hkv < Hq``.
        scale: factor on ``q @ k^T``.
        window: keys per query counted including the diagonal (``>= 1``): one int for every head,
            one per query head (heads of one key/value head with equal windows share matmuls), or
            None for no window (then ``causal`` decides between ``j <= p`` and every key).
        causal: bottom-right causal constraint when ``window`` is None (a window implies it).
        sink: leading keys every query sees in addition to its window (windows only).
        attn_mask: extra bool/additive mask broadcastable to ``(B, Hq, Nq, Nk)``, applied inside the band.
        chunk: query rows per interior chunk (``C``); ``None``: :func:`band_chunk` of each window.
        max_tile: score elements per edge-row tile and per batched interior matmul.
        normalize: softmax-weighted values (True) or the unnormalised ``Σ exp(s - m) v`` (False).
        out: optional contiguous ``(B, Hq, Nq, Dv)`` tensor to write into.
        parallel: run the work items on :func:`attnopt.codegen.cpu.pool.run_items`'s thread pool.

    Returns:
        ``(B, Hq, Nq, Dv)`` in q's dtype; with ``normalize`` it equals ``attention_reference`` with
        the same allowed map (rows with no visible key are 0).

    Raises:
        ValueError: on a window list of the wrong length, windows or chunk below 1, a sink
            without a window, or query heads not divisible by key/value heads.
    """
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if hq % hkv:
        raise ValueError(f"Expected query heads divisible by key/value heads, but got Hq={hq}, Hkv={hkv}.")
    groups = hq // hkv
    windows = _as_windows(window, hq)
    if any(w is not None and w < 1 for w in windows) or (chunk is not None and chunk < 1):
        raise ValueError(f"Expected windows >= 1 and chunk >= 1, but got windows={windows}, chunk={chunk}.")
    if sink and window is None:
        raise ValueError(
            f"Expected sink=0 without a window, but got sink={sink}. Pass a window with the sink."
        )
    if out is None or not out.is_contiguous():
        out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        mask = mask.expand(b, hq, nq, nk)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    job = _BandCall(
        q, k, v, out, mask, scale=scale, causal=causal, sink=min(sink, nk), chunk=chunk, max_tile=max_tile,
        normalize=normalize,
    )  # fmt: skip
    items = []
    for bi in range(b):
        for kh in range(hkv):
            same: dict[int | None, list[int]] = {}
            for h in range(kh * groups, (kh + 1) * groups):
                w = windows[h]
                same.setdefault(None if w is None else min(w, nk), []).append(h)
            items += [(bi, kh, tuple(heads), w) for w, heads in same.items()]
    run_items(items, job.item, parallel=parallel)
    if mask is not None and normalize:
        out.nan_to_num_(0.0)  # interior rows the extra mask empties entirely
    return out


class _BandCall:
    """One band-attention call, split into items: (batch, key/value head, query heads sharing a window)."""

    def __init__(
        self, q, k, v, out, mask, *, scale: float, causal: bool, sink: int, chunk: int | None, max_tile: int,
        normalize: bool,
    ) -> None:  # fmt: skip
        self.q, self.k, self.v, self.out, self.mask = q, k, v, out, mask
        self.scale, self.causal, self.sink, self.chunk = scale, causal, sink, chunk
        self.max_tile, self.normalize = max_tile, normalize
        self.offset = k.shape[2] - q.shape[2]

    def item(self, bi: int, kh: int, heads: tuple[int, ...], window: int | None) -> None:
        """Attention of query heads ``heads`` (all on key/value head ``kh``) of batch ``bi`` with one window."""
        q, out, mask, offset = self.q, self.out, self.mask, self.offset
        nq, d, dv = q.shape[2], q.shape[3], self.v.shape[-1]
        h0, g = heads[0], len(heads)
        run = heads == tuple(range(h0, h0 + g))
        index = None if run else torch.tensor(heads, device=q.device)
        qh = q[bi, h0 : h0 + g] if run else q[bi].index_select(0, index)
        res = out[bi, h0 : h0 + g] if run else torch.empty(g, nq, dv, dtype=q.dtype, device=q.device)
        mh = None if mask is None else (mask[bi, h0 : h0 + g] if run else mask[bi].index_select(0, index))
        kh_, vh_ = self.k[bi, kh], self.v[bi, kh]
        if window is None:
            self._rows(qh, kh_, vh_, mh, res, 0, nq, None)
        else:
            chunk = self.chunk or band_chunk(window)
            first = max(0, min(nq, window - 1 - offset))  # first row whose band starts at key >= 0
            nchunks = (nq - first) // chunk
            tail = first + nchunks * chunk
            if first and mh is None and offset == 0 and self.normalize and dv == d:
                # Rows before the first full window see every earlier key: plain causal attention, where
                # SDPA's flash kernel skips the upper triangle (half the work of a masked dense block).
                res[:, :first] = torch.nn.functional.scaled_dot_product_attention(
                    qh[None, :, :first], kh_[None, None, :first], vh_[None, None, :first],
                    is_causal=True, scale=self.scale, enable_gqa=g > 1,
                )[0]  # fmt: skip
            elif first:
                self._rows(qh, kh_, vh_, mh, res, 0, first, window)
            if tail < nq:
                self._rows(qh, kh_, vh_, mh, res, tail, nq, window)
            if nchunks:
                self._chunks(qh, kh_, vh_, mh, res, window, chunk, first, nchunks)
        if not run:
            out[bi].index_copy_(0, index, res)

    def _rows(self, qh, kbase, vbase, mh, res, r0: int, r1: int, window: int | None) -> None:
        """Rows ``[r0, r1)`` in tiles of at most ``max_tile`` scores, each over only the keys it can see."""
        g, d = qh.shape[0], qh.shape[-1]
        nk = kbase.shape[0]
        causal = self.causal or window is not None
        sink = self.sink if window is not None else 0
        step = max(16, self.max_tile // max(g * nk, 1))
        for s in range(r0, r1, step):
            e = min(s + step, r1)
            lo, hi = visible_keys(s, e, self.offset, nk, causal=causal, window=window)
            if hi <= lo:
                res[:, s:e] = 0  # no row of the tile sees a key
                continue
            ns = min(sink, lo)  # sink keys before the run (later ones are inside it)
            if ns:
                keys = torch.cat([torch.arange(ns, device=qh.device), torch.arange(lo, hi, device=qh.device)])
                ks, vs = kbase.index_select(0, keys), vbase.index_select(0, keys)
            else:
                ks, vs = kbase[lo:hi], vbase[lo:hi]
            scores = torch.mm(qh[:, s:e].reshape(g * (e - s), d), ks.t()).mul_(self.scale).view(g, e - s, -1)
            if causal:
                mask_band_edges(scores[..., ns:], s, e, lo, hi, self.offset, window, sink)
            if mh is not None:
                _apply_mask(scores, mh[:, s:e].index_select(-1, keys) if ns else mh[:, s:e, lo:hi])
            row_max = scores.amax(dim=-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)
            p = scores.sub_(row_max).exp_()
            acc = torch.matmul(p, vs)
            if self.normalize:
                total = p.sum(dim=-1, keepdim=True)
                acc.div_(torch.where(total > 0, total, torch.ones_like(total)))
            res[:, s:e] = acc

    def _chunks(self, qh, kbase, vbase, mh, res, window: int, chunk: int, first: int, nchunks: int) -> None:
        """The band proper: rows ``[first, first + nchunks * C)``, a few chunks per batched matmul."""
        sink, offset = self.sink, self.offset
        g, d, dv, dtype, device = qh.shape[0], qh.shape[-1], vbase.shape[-1], qh.dtype, qh.device
        lo, hi = _band_bias(chunk, window, sink, dtype)
        band = chunk + window - 1
        rows = g * chunk
        width = band + sink
        step = max(1, min(nchunks, self.max_tile // (rows * width)))
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
            if self.normalize:
                torch.ops.aten._softmax.out(s, -1, False, out=s)
            else:  # rows the extra mask empties get max 0 and weights exp(-inf) = 0
                s.sub_(s.amax(dim=-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)).exp_()
            dst = res[:, row0 : row0 + n * chunk].view(g, n, chunk, dv)
            if g == 1:
                torch.bmm(s, vview, out=dst[0])
            else:
                o = o_buf[: n * rows * dv].view(n, rows, dv)
                torch.bmm(s, vview, out=o)
                dst.copy_(o.view(n, g, chunk, dv).transpose(0, 1))


def _band_bias(chunk: int, window: int, sink: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks of a band chunk's lower edge (cols ``[0, C-1)``) and diagonal (cols ``[W, C+W-1)``).

    Column ``j`` of the band holds key ``p0 - W + 1 + j`` for a chunk whose first query sits at
    absolute position ``p0``; row ``i`` may see it iff ``i <= j <= i + W - 1``.
    """
    key = (chunk, window, sink, dtype)
    pair = _BIASES.get(key)
    if pair is None:
        i = torch.arange(chunk)[:, None]
        j = torch.arange(chunk + window - 1)[None, :]
        allowed = (j >= i) & (j <= i + window - 1)
        bias = as_additive(allowed, dtype)
        pair = _BIASES[key] = (bias[:, : chunk - 1].contiguous(), bias[:, window:].contiguous())
    return pair


def _sink_bias(
    chunk: int, window: int, sink: int, pos0: int, nchunks: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(nchunks, C, sink)`` bias: a sink key counts only where the window does not already hold it."""
    key = ("sink", chunk, window, sink, pos0, nchunks, dtype)
    pair = _BIASES.get(key)
    if pair is None:
        p = pos0 + torch.arange(nchunks * chunk).view(nchunks, chunk, 1)
        j = torch.arange(sink).view(1, 1, sink)
        bias = torch.zeros(nchunks, chunk, sink, dtype=dtype).masked_fill_(j >= p - window + 1, _NEG_INF)
        pair = _BIASES[key] = (bias, bias)
    return pair[0]


def _add_band_mask(s, mh, row0: int, key0: int, n: int, chunk: int, band: int, extra: int) -> None:
    """Apply the extra mask's band entries (``mh``: ``(G, Nq, Nk)``) to the score tile, as strided views (no gather)."""
    g = mh.shape[0]
    for gi in range(g):
        m = mh[gi]
        sr, sc = m.stride()
        view = m.as_strided(
            (n, chunk, band), (chunk * (sr + sc), sr, sc), m.storage_offset() + row0 * sr + key0 * sc
        )
        _apply_mask(s[:, :, extra:].view(n, g, chunk, band)[:, gi], view)
        if extra:
            sview = m.as_strided((n, chunk, extra), (chunk * sr, sr, sc), m.storage_offset() + row0 * sr)
            _apply_mask(s[:, :, :extra].view(n, g, chunk, extra)[:, gi], sview)
