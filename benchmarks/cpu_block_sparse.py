"""CPU benchmark of the block-sparse kernel against dense causal SDPA, measured as paired ratios.

Shape of the families issue: batch 1, 8 heads, head dim 64, fp32, causal, N=4096 (and 2048).
For each case the script alternates ``F.scaled_dot_product_attention(..., is_causal=True)`` and
the attnopt kernel on the same inputs and reports the median of the per-pair time ratios
(``sdpa_ms / attnopt_ms``; > 1 means attnopt is faster), so drift of the machine between pairs
cancels. FLOPs (for the GFLOP/s columns) count the scores each kernel must compute:
``4 * D * (scores)`` with scores ``N*(N+1)/2`` per head for causal SDPA and the allowed entries of
the sparse map for attnopt (useful work only).

Writes ``benchmarks/results/cpu_block_sparse.json`` and ``.md``. Usage::

    .venv/bin/python benchmarks/cpu_block_sparse.py [--pairs 7] [--threads 2] [--flex]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import attnopt.codegen.cpu.block_sparse as cpu_bs
from attnopt.codegen.cpu import band
from attnopt.codegen.ops import AttentionCall
from attnopt.replacements.block_layout import ElementRule
from attnopt.replacements.block_sparse import BlockSparseConfig, dynamic_layout
from attnopt.replacements.exact import attention_reference

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def paired(fa, fb, pairs: int) -> dict:
    """Median times and median per-pair ratio ``t(fa) / t(fb)`` of alternating runs."""
    fa(), fb()
    ta, tb, ratios = [], [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return {
        "sdpa_ms": 1e3 * statistics.median(ta),
        "attnopt_ms": 1e3 * statistics.median(tb),
        "ratio": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios],
    }


def call_for(q, k, v, cfg: BlockSparseConfig) -> AttentionCall:
    raw = {
        "site": "bench",
        "family": "block_sparse",
        "config": cfg.to_json(),
        "mask_static": True,
        "window": None,
    }
    return AttentionCall(q, k, v, None, [], q.shape[-1] ** -0.5, True, None, raw)


def head0_error(q, k, v, out, allowed) -> float:
    """Relative error of head 0 against ``attention_reference`` with the same allowed map (float64)."""
    ref = attention_reference(q[:, :1].double(), k[:, :1].double(), v[:, :1].double(), allowed[:, :1],
                              scale=q.shape[-1] ** -0.5)  # fmt: skip
    return float((out[:, :1].double() - ref).norm() / ref.norm())


def run_case(name: str, n: int, cfg: BlockSparseConfig, pairs: int, heads: int = 8, dim: int = 64,
             kv_heads: int | None = None) -> dict:  # fmt: skip
    torch.manual_seed(0)
    kv_heads = kv_heads or heads
    q = torch.randn(1, heads, n, dim)
    k, v = (torch.randn(1, kv_heads, n, dim) for _ in range(2))
    call = call_for(q, k, v, cfg)
    out = cpu_bs.block_sparse_cpu(call)
    if cfg.mode == "static":
        allowed = ElementRule(causal=True, window=cfg.windows, sink=cfg.sink).allowed(n, n)
        density = float(allowed.float().mean())
    else:
        layout = dynamic_layout(q, k, cfg, scale=dim**-0.5, causal=True)
        allowed = layout.to_dense()
        density = float(allowed.float().mean())
    err = head0_error(q, k, v, out, allowed)
    gqa = kv_heads != heads
    res = paired(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
                 lambda: cpu_bs.block_sparse_cpu(call), pairs)  # fmt: skip
    scores_dense = heads * n * (n + 1) / 2
    scores_sparse = density * heads * n * n
    res.update(
        case=name,
        N=n,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=dim,
        config=cfg.describe(),
        density_of_full_map=round(density, 4),
        density_of_causal=round(density * n / ((n + 1) / 2), 4),
        rel_err_vs_reference=err,
        sdpa_gflops=4 * dim * scores_dense / res["sdpa_ms"] / 1e6,
        attnopt_useful_gflops=4 * dim * scores_sparse / res["attnopt_ms"] / 1e6,
    )
    print(f"{name:38s} sdpa {res['sdpa_ms']:8.1f} ms  attnopt {res['attnopt_ms']:8.1f} ms  "
          f"ratio {res['ratio']:.2f}x  err {err:.1e}", flush=True)  # fmt: skip
    return res


def flex_case(n: int, window: int, pairs: int, heads: int = 8, dim: int = 64) -> dict | None:
    """FlexAttention + torch.compile on the same sliding window (optional; skipped if it fails)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (ki > qi - window)

    bm = create_block_mask(mask_mod, 1, 1, n, n, device="cpu")
    compiled = torch.compile(flex_attention)
    t0 = time.perf_counter()
    compiled(q, k, v, block_mask=bm)
    compile_s = time.perf_counter() - t0
    res = paired(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                 lambda: compiled(q, k, v, block_mask=bm), pairs)  # fmt: skip
    res.update(case=f"flex+compile window={window}", N=n, compile_s=compile_s)
    print(f"flex+compile N={n} w={window}: ratio {res['ratio']:.2f}x (compile {compile_s:.0f}s)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--single-thread-too", action="store_true", help="repeat the main case with 1 thread")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention under torch.compile")
    ap.add_argument("--sweep", action="store_true", help="also time the main case at chunk 32/64/128/256")
    ap.add_argument("--out", default=str(RESULTS / "cpu_block_sparse"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    static = BlockSparseConfig(mode="static", sink=0, windows=(512,), min_window=1, calib_len=4096)
    sink = BlockSparseConfig(mode="static", sink=4, windows=(512,), min_window=1, calib_len=4096)
    cases = [
        ("static window=512 N=4096", 4096, static),
        ("static sink=4 window=512 N=4096", 4096, sink),
        ("static window=512 N=2048", 2048, static),
        # top-k share of reachable blocks, plus the always-kept sink and local blocks: ~10% / ~25% of causal.
        ("dynamic top5% block=64 N=4096", 4096, BlockSparseConfig(mode="dynamic", density=0.05, block=64)),
        ("dynamic top20% block=64 N=4096", 4096, BlockSparseConfig(mode="dynamic", density=0.2, block=64)),
    ]
    rows = [run_case(name, n, cfg, args.pairs) for name, n, cfg in cases]
    # codelm's shape (4 heads on 2 KV heads, N=2048) with per-head windows the planner fitted there
    # (benchmarks/results/planning*.md), all heads in one call
    for windows in ((64, 90, 127, 131), (222, 129, 125, 228), (467, 463, 413, 454)):
        cfg = BlockSparseConfig(mode="static", sink=4, windows=windows, min_window=1, calib_len=2048)
        name = f"codelm shape sink=4 windows={list(windows)}"
        rows.append(run_case(name, 2048, cfg, args.pairs, heads=4, kv_heads=2))
    if args.sweep:
        default = band.DEFAULT_CHUNK  # the band engine reads its own knob at call time
        for chunk in (32, 64, 128, 256):
            band.DEFAULT_CHUNK = chunk
            rows.append(
                {
                    **run_case(f"static window=512 N=4096 chunk={chunk}", 4096, static, args.pairs),
                    "chunk": chunk,
                }
            )
        band.DEFAULT_CHUNK = default
    if args.single_thread_too:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rows.append(
            {**run_case("static window=512 N=4096 (1 thread)", 4096, static, args.pairs), "threads": 1}
        )
        torch.set_num_threads(threads)
    if args.flex:
        try:
            flex = flex_case(4096, 512, args.pairs)
            if flex:
                rows.append(flex)
        except Exception as e:  # noqa: BLE001 - optional peer, report and go on
            print(f"flex+compile failed: {type(e).__name__}: {e}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{cpu_model()} ({os.cpu_count()} cores visible)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "pairs": args.pairs,
        "band_chunk": band.DEFAULT_CHUNK,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        "# CPU block-sparse vs dense causal SDPA",
        "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['threads']} threads · "
        f"load average before/after {load_before[0]:.1f}/{meta['loadavg_after'][0]:.1f} · median of {args.pairs} "
        "paired runs (ratio = SDPA ms / attnopt ms, > 1 is faster)",
        "",
        "density: share of the N x N map computed (full map) and of the causal triangle; rel err: head 0 against",
        "`attention_reference` with the same allowed map (float64).",
        "",
        "| case | density (full map) | density (of causal) | SDPA ms | attnopt ms | ratio | rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r.get('density_of_full_map', '')} | {r.get('density_of_causal', '')} | "
            f"{r['sdpa_ms']:.1f} | {r['attnopt_ms']:.1f} | "
            f"**{r['ratio']:.2f}x** | {r.get('rel_err_vs_reference', float('nan')):.1e} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
