"""How well the cost model predicts site latency: predicted vs measured, per family and shape.

For every family with a CPU kernel registered in ``attnopt.codegen.ops.KERNELS`` at run time,
candidates are fitted once on a short synthetic site (as profiling does) and timed through
``torch.ops.attnopt.<family>`` at shapes *different from the profiling shapes*; the prediction
uses the local profile measured in the same run. Also compares the H100 seed profile with the
cuDNN SDPA times recorded in ANCHORS.md (prediction only, no GPU needed).

Writes ``benchmarks/results/cost_fidelity.{json,md}``. Target: median |error| <= 20%, every
row <= 40%.

Usage::

    python benchmarks/cost_fidelity.py [--threads 1] [--cached] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from attnopt.codegen.ops import KERNELS  # noqa: E402
from attnopt.cost_model.device import SEED_PROFILES, versions  # noqa: E402
from attnopt.cost_model.latency import measure_latency, predict_latency  # noqa: E402
from attnopt.cost_model.profiling import _fit_candidates, load_kernels, profile_device  # noqa: E402
from attnopt.cost_model.synthetic import make_site, structured_qkv  # noqa: E402
from attnopt.replacements.base import get_family  # noqa: E402
from attnopt.replacements.exact import ExactFamily  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

#: (heads, seq, head_dim, causal): none of them is a profiling shape.
SHAPES = (
    (4, 384, 64, True),
    (8, 768, 64, True),
    (4, 1536, 64, True),
    (2, 3072, 64, True),
    (8, 1024, 32, True),
    (4, 768, 64, False),
    (2, 1536, 128, False),
)

#: cuDNN SDPA on one H100 (ANCHORS.md): (N, causal) -> ms, batch 1, 32 heads, d 128, bf16.
ANCHOR_CUDNN_MS = {(2048, False): 0.115, (2048, True): 0.087, (8192, False): 1.803, (8192, True): 0.998,
                   (32768, False): 27.925, (32768, True): 14.415}  # fmt: skip


def _families() -> list[str]:
    load_kernels("cpu")
    fams = {f for f, dev in KERNELS if dev in ("cpu", "any")}
    return ["exact"] + sorted(fams - {"exact"})


def current_matmul_tflops() -> float:
    """The fp32 matmul rate right now: the same probe profiling uses, to see how loaded the box is."""
    from attnopt.cost_model._timing import median_time

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_time(lambda: a @ b, warmup=1, repeats=3) / 1e12


def measure_rows(profile, families, repeats: int, max_candidates: int) -> list[dict]:
    rows = []
    for family in families:
        fam = get_family(family)
        fitted: dict = {}
        for heads, seq, d, causal in SHAPES:
            site = make_site(f"bench.{family}#0", heads=heads, seq=seq, head_dim=d, causal=causal)
            key = (heads, d, causal)
            try:
                if key not in fitted:
                    fitted[key] = _fit_candidates(fam, heads, d, causal, max_candidates)
                q, k, v = structured_qkv(site, generator=torch.Generator().manual_seed(seq))
                for cand in fitted[key]:
                    cand.cost = fam.cost(site, cand.config)
                    before = current_matmul_tflops()
                    measured = measure_latency(site, cand, q, k, v, repeats=repeats, cache=False)
                    load = profile.matmul_tflops["float32"] / statistics.mean(
                        [before, current_matmul_tflops()]
                    )
                    predicted = predict_latency(site, cand, profile)
                    rows.append(
                        {
                            "family": family,
                            "candidate": cand.label,
                            "heads": heads,
                            "seq": seq,
                            "head_dim": d,
                            "causal": causal,
                            "predicted_ms": predicted * 1e3,
                            "measured_ms": measured * 1e3,
                            "error": (predicted - measured) / measured,
                            "load_factor": load,
                            "corrected_ms": predicted * load * 1e3,
                            "corrected_error": (predicted * load - measured) / measured,
                        }
                    )
                    print(f"{family:12s} H={heads} N={seq} D={d} causal={causal}: "
                          f"pred {predicted * 1e3:8.2f} ms  meas {measured * 1e3:8.2f} ms  "
                          f"err {rows[-1]['error']:+.0%}  load-corrected {rows[-1]['corrected_error']:+.0%}",
                          flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001  (a family still being written is reported, not fatal)
                print(f"{family}: skipped at {key}: {e}", flush=True)
                rows.append({"family": family, "skipped": str(e)[:200], "heads": heads, "seq": seq})
                break
    return rows


def anchor_rows() -> list[dict]:
    prof = SEED_PROFILES["h100"]
    rows = []
    for (n, causal), ms in ANCHOR_CUDNN_MS.items():
        site = make_site(heads=32, seq=n, head_dim=128, causal=causal, dtype="bfloat16")
        cand = ExactFamily().candidates(site, None)[0]
        pred = predict_latency(site, cand, prof) * 1e3
        rows.append(
            {"seq": n, "causal": causal, "predicted_ms": pred, "anchor_ms": ms, "error": (pred - ms) / ms}
        )
    return rows


def summarise(rows: list[dict], key: str = "error") -> dict:
    errs = [abs(r[key]) for r in rows if key in r]
    per_family = {}
    for fam in sorted({r["family"] for r in rows if key in r}):
        fe = [abs(r[key]) for r in rows if r.get("family") == fam and key in r]
        per_family[fam] = {
            "median_abs_error": statistics.median(fe),
            "max_abs_error": max(fe),
            "rows": len(fe),
        }
    return {
        "median_abs_error": statistics.median(errs) if errs else None,
        "max_abs_error": max(errs) if errs else None,
        "rows_within_40pct": sum(e <= 0.4 for e in errs),
        "rows": len(errs),
        "per_family": per_family,
    }


def _summary_lines(title: str, summary: dict) -> list[str]:
    lines = [
        f"**{title}: median |error| {summary['median_abs_error']:.0%}, max {summary['max_abs_error']:.0%}, "
        f"{summary['rows_within_40pct']}/{summary['rows']} rows within 40%.**",
        "",
        "| family | median abs err | max abs err | rows |",
        "|---|---|---|---|",
    ]
    for fam, s in summary["per_family"].items():
        lines.append(f"| {fam} | {s['median_abs_error']:.0%} | {s['max_abs_error']:.0%} | {s['rows']} |")
    return lines + [""]


def write_markdown(path: pathlib.Path, meta: dict, rows, summaries, anchors) -> None:
    lines = [
        "# Cost-model fidelity: predicted vs measured site latency",
        "",
        f"- date: {meta['date']}",
        f"- device: {meta['device']} ({meta['threads']} torch threads, {meta['clock']} clock), load average "
        f"{meta['load_start']} at start, {meta['load_end']} at end (the box is shared with other jobs)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}, python {meta['python']}",
        f"- profile: {meta['profile_source']} (matmul {meta['profile']['fields']['matmul_tflops']['float32'] * 1e3:.1f} "
        "GFLOP/s fp32 at profiling time)",
        "- target: median |error| <= 20%, every row <= 40%",
        "- raw = the profile's prediction as is; load-corrected = prediction scaled by the profile's matmul rate over",
        "  the matmul rate probed right before and after the row (how much slower the shared box was at that moment)",
        "",
    ]
    lines += _summary_lines("Raw", summaries["raw"])
    lines += _summary_lines("Load-corrected", summaries["load_corrected"])
    lines += [
        "| family | candidate | H | N | D | causal | predicted ms | measured ms | error | load factor | corrected error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" not in r:
            lines.append(
                f"| {r['family']} | skipped: {r['skipped']} | {r['heads']} | {r['seq']} | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['family']} | {r['candidate']} | {r['heads']} | {r['seq']} | {r['head_dim']} | {r['causal']} | "
            f"{r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {r['error']:+.0%} | {r['load_factor']:.2f} | "
            f"{r['corrected_error']:+.0%} |"
        )
    lines += [
        "",
        "## H100 seed profile vs ANCHORS.md (cuDNN SDPA, B=1, H=32, D=128, bf16; prediction only)",
        "",
        "| N | causal | predicted ms | ANCHORS ms | error |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {a['seq']} | {a['causal']} | {a['predicted_ms']:.3f} | {a['anchor_ms']:.3f} | {a['error']:+.0%} |"
        for a in anchors
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps a shared box's noise down)"
    )
    ap.add_argument("--cached", action="store_true", help="reuse a cached profile instead of measuring now")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-candidates", type=int, default=1)
    ap.add_argument(
        "--clock", choices=("wall", "thread"), default="wall", help="thread: CPU time (1 thread only)"
    )
    ap.add_argument("--out", default="cost_fidelity", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    os.environ["ATTNOPT_CLOCK"] = args.clock
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    families = _families()
    # a thread-clock profile must not land in the user's cache, where wall-clock planning would find it
    cache = tempfile.mkdtemp(prefix="attnopt-fidelity-") if args.clock == "thread" else None
    profile = profile_device("cpu", cache, refresh=not args.cached, families=families)
    t_profile = time.perf_counter() - t0
    rows = measure_rows(profile, families, args.repeats, args.max_candidates)
    anchors = anchor_rows()
    summaries = {"raw": summarise(rows), "load_corrected": summarise(rows, "corrected_error")}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": profile.name,
        "threads": args.threads,
        "clock": args.clock,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "profile_source": profile.source,
        "profile_seconds": t_profile,
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "profile": profile.to_json(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, "summary": summaries, "rows": rows, "h100_seed_vs_anchors": anchors}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2))
    write_markdown(RESULTS / f"{args.out}.md", meta, rows, summaries, anchors)
    print(json.dumps({k: {m: v[m] for m in ("median_abs_error", "max_abs_error", "rows_within_40pct", "rows")}
                      for k, v in summaries.items()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
