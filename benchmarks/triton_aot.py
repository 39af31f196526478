"""Compile every attnopt Triton kernel case ahead of time for sm_80, sm_90 and sm_100; no GPU needed.

Usage::

    python benchmarks/triton_aot.py                      # every case of aot_cases.CASES, all three targets
    python benchmarks/triton_aot.py --targets 90 --cases dense/int8-fp16-llama-causal

One row per (case, target): registers, spill stores / loads and stack frame (bytes) as ``ptxas -v``
reports them, shared memory (bytes, the compiled kernel's metadata), cubin size and compile seconds
(the whole Triton pipeline, cold cache, one process, cases in order). The compile options are each
kernel's first autotune config, the one the interpreter tests run. Writes ``triton_aot.json`` and
``triton_aot.md`` (triton, torch and ptxas versions, date, table) into ``benchmarks/results/``
(or ``--out``). The test ``tests/codegen/test_triton_aot.py`` compiles the same cases (sm_90 all,
sm_80/sm_100 the representative ones) and fails on any compile error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions: before the first triton import

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from attnopt.codegen.triton.aot import AotResult, run_cases  # noqa: E402
from attnopt.codegen.triton.aot_cases import CASES, TARGETS  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _ptxas_versions(targets: tuple[int, ...]) -> dict[str, str]:
    from triton.backends.nvidia.compiler import get_ptxas

    return {f"sm_{cc}": f"{pathlib.Path(get_ptxas(cc).path).name} {get_ptxas(cc).version}" for cc in targets}


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def _spill_summary(rows: list[dict]) -> list[str]:
    """One line per target: how many compiled cases spill, and the worst one."""
    lines = []
    for cc in sorted({r["target"] for r in rows}):
        done = [r for r in rows if r["target"] == cc and r["status"] == "ok"]
        spilling = sorted((r for r in done if r["spill_stores"]), key=lambda r: -r["spill_stores"])
        worst = f"; most: {spilling[0]['case']} ({spilling[0]['spill_stores']} B)" if spilling else ""
        lines.append(f"- sm_{cc}: {len(spilling)} of {len(done)} compiled cases spill{worst}")
    return [*lines, ""]


def markdown(report: dict) -> str:
    """The report as a Markdown page: header, then one table row per (case, target)."""
    meta = report["meta"]
    ptxas = ", ".join(f"{k}: {v}" for k, v in meta["ptxas"].items())
    lines = [
        "# Triton AOT compile: every kernel case for sm_80 / sm_90 / sm_100",
        "",
        f"{meta['date']} · triton {meta['triton']} · torch {meta['torch']} · python {meta['python']} · "
        f"{ptxas} · {meta['host']} · load average before/after {meta['loadavg_before']:.1f}/"
        f"{meta['loadavg_after']:.1f} · {meta['total_s']:.0f} s for {len(report['rows'])} rows",
        "",
        "Compiled on the CPU with `triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32))`; signature "
        "and constexprs are what each host wrapper passes (captured on meta tensors), options the kernel's "
        "first autotune config. regs / spills (bytes stored / loaded) / stack from `ptxas -v`; smem = "
        "the kernel's shared memory (bytes); s = compile seconds (cold cache).",
        "",
        "Status: " + ", ".join(f"{n} {status}" for status, n in meta["counts"].items()) + ".",
        "",
        *_spill_summary(report["rows"]),
        "| case | target | status | warps/stages | regs | spill st | spill ld | stack | smem | cubin KiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        status = r["status"] if r["status"] != "skipped" else "skipped: " + r["error"].split(":")[0]
        if r["status"] == "failed":
            status = f"**failed**: {r['error'].splitlines()[0][:120]}"
        warps = f"{r['num_warps']}/{r['num_stages']}" if r["num_warps"] else ""
        kib = f"{r['cubin_bytes'] / 1024:.0f}" if r["cubin_bytes"] else ""
        lines.append(
            f"| {r['case']} | sm_{r['target']} | {status} | {warps} | {_cell(r['registers'])} | "
            f"{_cell(r['spill_stores'])} | {_cell(r['spill_loads'])} | {_cell(r['stack'])} | {_cell(r['shared'])} | "
            f"{kib} | {_cell(r['seconds'])} |"
        )
    lines += ["", "Constexprs per case (sm_90 rows):", ""]
    lines += [f"- `{r['case']}`: {r['spec']}" for r in report["rows"] if r["target"] == 90 and r["spec"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="output directory")
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    wanted = [n for n in args.cases.split(",") if n]
    cases = [c for c in CASES if not wanted or c.name in wanted]
    if wanted and len(cases) != len(wanted):
        parser.error(f"unknown cases {sorted(set(wanted) - {c.name for c in cases})}")

    def progress(r: AotResult) -> None:
        detail = (
            r.error.splitlines()[0][:100] if r.error else f"{r.registers} regs, {r.spill_stores} B spilled"
        )
        print(f"sm_{r.target} {r.case}: {r.status} ({detail}) {r.seconds or 0:.1f} s", flush=True)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = [dataclasses.asdict(r) for r in run_cases(cases, targets, progress)]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "ptxas": _ptxas_versions(targets),
            "host": f"{platform.machine()} ({os.cpu_count()} cores visible)",
            "targets": list(targets),
            "total_s": round(time.perf_counter() - t0, 1),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
            "counts": counts,
        },
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_aot.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "triton_aot.md").write_text(markdown(report))
    print(f"{counts} in {report['meta']['total_s']} s; wrote {out / 'triton_aot.md'}")
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["meta"]["counts"]["failed"] else 0)
