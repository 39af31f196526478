"""CPU kernel of ``attnopt::block_sparse``: the band path for static mode, the layout path otherwise.

Both paths are written as a few large batched matmuls because that is what a 2-core CPU runs
near its peak (the CPU flash kernel on small masked blocks runs at a fifth of it):

* **band** (static sinks + sliding window, causal): :mod:`attnopt.codegen.cpu.band`, the banded
  softmax every windowed CPU kernel shares; per-head windows run in one call. Its chunk knobs
  (``DEFAULT_CHUNK``, ``SMALL_WINDOW``, ``SMALL_WINDOW_CHUNK``) are re-exported here for
  readers; they live, and are read at call time, in that module.
* **layout** (dynamic selection, skip-softmax, any :class:`BlockLayout`):
  :mod:`attnopt.codegen.cpu.layout`.

Parallelism: torch's threaded ops by default; with :data:`PARALLEL_ITEMS` independent items (a
(batch, kv head, window) of the band path, a tile of rows of the layout path) run on the thread
pool of :mod:`attnopt.codegen.cpu.pool`, which also caches the paths' scratch buffers per thread.

Measured (benchmarks/results/cpu_block_sparse.md, 2-core AMD EPYC, B=1, H=8, D=64, fp32,
causal N=4096, window 512): 2.36-2.62x causal SDPA over four runs (each the median of 7 paired
runs); codelm's shape (H=4, Hkv=2, N=2048, sink 4): 2.18x with windows [64, 90, 127, 131], 1.80x
with [222, 129, 125, 228].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnopt.codegen.cpu import band as _band
from attnopt.codegen.cpu import layout as _layout
from attnopt.codegen.cpu.band import DEFAULT_CHUNK, SMALL_WINDOW, SMALL_WINDOW_CHUNK
from attnopt.codegen.ops import AttentionCall, register_kernel
from attnopt.patterns.masks import combined_allowed, merge_allowed
from attnopt.replacements.block_layout import BlockLayout
from attnopt.replacements.block_sparse import BlockSparseConfig, layout_for, static_windows

__all__ = [
    "DEFAULT_CHUNK",
    "PARALLEL_ITEMS",
    "SMALL_WINDOW",
    "SMALL_WINDOW_CHUNK",
    "band_attention",
    "block_sparse_cpu",
    "layout_attention",
]

#: Run independent items on a pool of ``torch.get_num_threads()`` Python threads, each running
#: single-threaded ops, instead of running them in order with torch's own threaded ops. Off by
#: default: measured on the 2-core VM (B=1, H=4, Hkv=2, N=2048, D=64, sink 4, per-head windows
#: [87, 252, 276, 408]) the pool gives 1.43x SDPA and threaded ops 1.73x, because switching torch's
#: thread count for the pool makes the next threaded op respawn its OpenMP team (about 3 ms). Under
#: heavy load from other processes (load average ~6) the pool measured better (2.5x vs 0.9x at
#: H=8, N=4096): every threaded op is an OpenMP barrier that one descheduled thread stalls.
#: Read at call time by both paths.
PARALLEL_ITEMS = False


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
) -> torch.Tensor:
    """:func:`attnopt.codegen.cpu.band.band_attention` with this kernel's :data:`PARALLEL_ITEMS` setting.

    Causal (bottom-right) attention where query ``p`` of head ``h`` sees keys
    ``(p - window[h], p]`` and keys ``< sink``; arguments as there.
    """
    return _band.band_attention(
        q, k, v, scale=scale, window=window, sink=sink, attn_mask=attn_mask, chunk=chunk, out=out,
        parallel=PARALLEL_ITEMS,
    )  # fmt: skip


def layout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`attnopt.codegen.cpu.layout.layout_attention` with this kernel's :data:`PARALLEL_ITEMS` setting."""
    return _layout.layout_attention(
        q, k, v, layout, scale=scale, attn_mask=attn_mask, parallel=PARALLEL_ITEMS
    )


# -- the registered kernel -----------------------------------------------------------------


def _static(call: AttentionCall, cfg: BlockSparseConfig) -> torch.Tensor:
    if not call.causal:
        raise ValueError(
            f"Expected a causal call for static sink+window mode (site {call.config.get('site', '?')}), but got "
            "is_causal=False. Plan this site with mode='dynamic' instead."
        )
    windows = static_windows(cfg, call.k.shape[2], call.q.shape[1])
    if call.window:
        windows = [min(w, call.window) for w in windows]
    return band_attention(call.q, call.k, call.v, scale=call.scale, window=windows, sink=cfg.sink,
                          attn_mask=call.attn_mask)  # fmt: skip


@register_kernel("block_sparse", "cpu")
def block_sparse_cpu(call: AttentionCall) -> torch.Tensor:
    """CPU kernel of ``attnopt::block_sparse``: the band path for static mode, the layout path otherwise."""
    cfg = call.family_config(BlockSparseConfig)
    if cfg.mode == "static":
        return _static(call, cfg)
    q, k = call.q, call.k
    mask = call.attn_mask
    if call.window:  # the site's own sliding window rides along as an extra mask
        win = combined_allowed(q.shape[-2], k.shape[-2], causal=True, window=call.window, device=q.device)
        mask = merge_allowed(mask, win)
    layout = layout_for(q, k, cfg, scale=call.scale, causal=call.causal, attn_mask=mask)
    return layout_attention(q, k, call.v, layout, scale=call.scale, attn_mask=mask)
