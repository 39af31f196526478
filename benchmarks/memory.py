"""Memory of planning and of serving many models: peaks measured, one subprocess per measurement.

* **Planning peak** of a synthetic Llama (codelm's shape: 4 layers, 4 heads, 2 KV heads, head
  dim 64, random weights, SDPA) at N=2048 and N=8192 on the CPU: resident memory before
  planning, the high-water mark of one exact forward of a calibration call, and the high-water
  mark of ``attnopt.plan`` (``measure=False``: predicted latencies, so no kernel timing).
* **Calibration state vs calibration set size**: the bytes calibration keeps (samples and
  statistics) and the planning peak with 8 and with 32 calibration calls at N=2048 (a quarter held out).
* **Optimise/run/delete cycles**: 20 models optimised, run and dropped in one process (a
  rewritten torch model, which runs through dynamo, and a Hugging Face BERT, which is routed
  through transformers' attention registry): resident memory per cycle, attnopt's per-model
  registries before and after, and whether every model and plan was freed.

Writes ``benchmarks/results/memory.{json,md}``. Usage: ``python benchmarks/memory.py
[--smoke] [--out DIR]``; ``--smoke`` runs tiny sizes (the CI test).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _llama(n: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=max(n, 2048), attn_implementation="sdpa",
        use_cache=False,
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval()


def child_plan(n: int, batches: int) -> dict:
    """One planning run in this (fresh) process; memory in MiB."""
    import torch

    from attnopt.pipeline.run import run_plan

    model = _llama(n)
    gen = torch.Generator().manual_seed(1)
    calls = [{"input_ids": torch.randint(1, 256, (1, n), generator=gen)} for _ in range(batches)]
    with torch.no_grad():
        model(**calls[0])
    gc.collect()
    before, forward_peak = _rss_mb(), _peak_mb()
    start = time.perf_counter()
    run = run_plan(model, "2x", calls, measure=False, progress=False)
    seconds = time.perf_counter() - start
    stats_bytes = sum(
        t.nbytes
        for st in run.stats.values()
        for t in (*st.q, *st.k, *st.v, *st.attn_mask, st.sink_mass, st.distance_mass, st.entropy, st.head_similarity)
        if isinstance(t, torch.Tensor)
    )
    return {
        "n": n, "batches": batches, "sites": len(run.stats), "rss_before_mb": round(before, 1),
        "forward_peak_mb": round(forward_peak, 1), "planning_peak_mb": round(_peak_mb(), 1),
        "planning_over_before_mb": round(_peak_mb() - before, 1), "calibration_state_mb": round(stats_bytes / 2**20, 2),
        "plan_seconds": round(seconds, 1), "speedup": round(run.plan.totals.get("speedup", 1.0), 2),
    }  # fmt: skip


def child_cycles(name: str, cycles: int) -> dict:
    """``cycles`` optimise/run/delete rounds of the zoo model ``name`` in this process."""
    import torch

    from attnopt.codegen.memo import cache_sizes
    from tests.test_memory import _cycle, _registries
    from tests.zoo import by_name

    entry = by_name(name)
    gc.collect()
    before = _registries()
    rss, refs = [], []
    for seed in range(cycles):
        refs += _cycle(entry, seed)
        gc.collect()
        rss.append(round(_rss_mb(), 1))
    after = _registries()
    growth = rss[-1] - rss[min(1, len(rss) - 1)]
    torch._dynamo.reset()
    gc.collect()
    return {
        "model": name, "cycles": cycles, "rss_mb": rss, "growth_after_first_mb": round(growth, 1),
        "growth_per_cycle_mb": round(growth / max(cycles - 2, 1), 2), "rss_after_dynamo_reset_mb": round(_rss_mb(), 1),
        "registries_before": before, "registries_after": after, "all_freed": all(r() is None for r in refs),
        "bounded_caches": {k: list(v) for k, v in cache_sizes().items() if v[0]},
    }  # fmt: skip


def _run_child(kind: str, **params) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(params)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3000)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {**params, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def to_markdown(result: dict) -> str:
    """The results as a README-ready table."""
    lines = [
        "# Memory: planning peaks and optimise/run/delete cycles", "",
        f"{result['date']}; {result['cpu']}; torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}; one subprocess per row. MiB of resident memory.", "",
        "| N | calib calls | sites | RSS before | exact forward peak | planning peak | peak - before "
        "| calibration state | plan s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in result["planning"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['batches']} | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['n']} | {r['batches']} | {r['sites']} | {r['rss_before_mb']} | {r['forward_peak_mb']} | "
            f"{r['planning_peak_mb']} | {r['planning_over_before_mb']} | {r['calibration_state_mb']} | {r['plan_seconds']} |"
        )
    lines += ["", "| model | cycles | RSS first → last | growth after cycle 1 | per cycle | registries before → after "
              "| all freed |", "|---|---:|---|---:|---:|---|---|"]  # fmt: skip
    for c in result["cycles"]:
        if "error" in c:
            lines.append(f"| {c['model']} | error: {c['error']} ||||||")
            continue
        regs = ", ".join(f"{k} {c['registries_before'][k]}→{v}" for k, v in c["registries_after"].items())
        lines.append(
            f"| {c['model']} | {c['cycles']} | {c['rss_mb'][0]} → {c['rss_mb'][-1]} | {c['growth_after_first_mb']} | "
            f"{c['growth_per_cycle_mb']} | {regs} | {c['all_freed']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PARAMS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, params = args.child[0], json.loads(args.child[1])
        print(json.dumps({"plan": child_plan, "cycles": child_cycles}[kind](**params)))
        return {}
    import torch
    import transformers

    plans = [(128, 6), (128, 12)] if args.smoke else [(2048, 8), (2048, 32), (8192, 6)]
    cycles = 3 if args.smoke else 20
    result = {
        "date": datetime.date.today().isoformat(), "cpu": _cpu(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "planning": [_run_child("plan", n=n, batches=b) for n, b in plans],
        "cycles": [_run_child("cycles", name=name, cycles=cycles) for name in ("nanogpt", "bert-sdpa")],
    }  # fmt: skip
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "memory.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
