"""The one prepared GPU run: tests, kernels against their peers, end-to-end prefill — in one command.

GPU time comes in short leases (about 15 minutes in all, machine start included), so everything a
GPU can prove is run from here, in one call, in order of what it proves:

1. **tests** — the Triton kernel tests (``tests/codegen/test_triton_*.py`` minus the ahead-of-time
   compile test, which needs no GPU) and every test marked ``gpu``, compiled for the real device
   instead of the interpreter; several pytest workers when ``pytest-xdist`` is there, since the time
   goes to compiling kernel specialisations on the host CPUs;
2. **kernels** — ``benchmarks/kernels.py``: attnopt's kernels beside SDPA flash / cuDNN,
   FlexAttention on the identical BlockMask, SageAttention and fla when installed, at the shapes of
   ``../shared/ANCHORS.md`` (B=1, H=32, D=128, N 8192 and 32768, bf16);
3. **end to end** — ``benchmarks/end_to_end.py``: a ~1B Llama prefill at N=8192 and 32768 with
   attnopt ``2x`` and ``4x`` against SDPA's fastest backend (``--compile`` adds the torch.compile rows).

Each phase runs in its own process under a share of one overall deadline (``--deadline``, default
540 s), so a hang or crash in one phase cannot take the others' results with it; what a phase prints
goes to ``gpu_check.log``. Results land in one folder (``--out``, e.g. ``$OUT`` on the device machine),
at most 7 files: ``gpu_check.{json,md,log}``, ``kernels-<device>.{json,md}``,
``end_to_end.{json,md}``. Rerunning overwrites them (safe to run twice). A summary table is
printed last.

Usage::

    python benchmarks/gpu_check.py --out $OUT                  # everything, ~7 minutes on an H200
    python benchmarks/gpu_check.py --out $OUT --only kernels   # one phase (tests, kernels, e2e)
    python benchmarks/gpu_check.py --dry-run --out /tmp/g      # CPU: print the phase commands only
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("tests", "kernels", "e2e")
#: Seconds each phase may take at most, before the overall deadline caps it further.
PHASE_CAPS = {"tests": 90.0, "kernels": 150.0, "e2e": 400.0}
#: Seconds kept back at the end for the summary and the file transfer.
RESERVE_S = 15.0
TRITON_TESTS = ("test_triton_block_sparse.py", "test_triton_quantized.py", "test_triton_shared.py",
                "test_triton_linear.py")  # fmt: skip


def phase_commands(out: pathlib.Path, *, compile_e2e: bool, e2e_time_limit: float) -> dict[str, list[str]]:
    """The command line of each phase (run from the repository root)."""
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
             *(f"tests/codegen/{name}" for name in TRITON_TESTS)]  # fmt: skip
    if importlib.util.find_spec("xdist") is not None:
        tests += ["-n", str(min(12, max(1, (os.cpu_count() or 2) - 2)))]
    kernels = [
        py,
        "benchmarks/kernels.py",
        "--ns",
        "8192",
        "32768",
        "--dtypes",
        "bfloat16",
        "--out",
        str(out),
    ]
    e2e = [py, "benchmarks/end_to_end.py", "--lengths", "32768", "8192", "--target-n", "32768",
           "--out", str(out), "--time-limit", f"{e2e_time_limit:.0f}"]  # fmt: skip
    e2e.append("--compile" if compile_e2e else "--no-compile")
    return {"tests": tests, "kernels": kernels, "e2e": e2e}


def run_phase(name: str, cmd: list[str], timeout: float, log: pathlib.Path) -> dict[str, Any]:
    """Run one phase with its output appended to ``log``; never raises."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the device, never the interpreter
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 1.0), check=False)  # fmt: skip
            status, rc = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
        except OSError as e:
            status, rc = f"could not start: {e}", None
        fh.write(f"===== {name}: {status} (rc {rc}) in {time.perf_counter() - t0:.1f} s\n")
    return {"phase": name, "status": status, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}


def _phase_log(log: pathlib.Path, name: str) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    parts = text.split(f"===== {name}: ")
    return parts[1] if len(parts) > 1 else ""


def pytest_counts(text: str) -> dict[str, int]:
    """``{"passed": n, "failed": m, ...}`` from pytest's last summary line in ``text``."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if not lines:
        return {}
    return {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", lines[-1])
    }


def _load(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kernel_summary(out: pathlib.Path) -> list[dict[str, Any]]:
    """Kernel rows with their ratio to the fastest SDPA backend at the same N and dtype."""
    files = sorted(p for p in out.glob("kernels-*.json") if "smoke" not in p.name)
    report = _load(files[-1]) if files else None
    if report:
        rows = report["rows"]
    else:  # cut short before kernels.py wrote its files: the rows it printed, one JSON object a line
        rows = []
        for line in _phase_log(out / "gpu_check.log", "kernels").splitlines():
            if line.startswith('{"name"'):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    best = {}
    for r in rows:
        if r["name"].startswith("sdpa_"):
            key = (r["n"], r["dtype"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        ref = best.get((r["n"], r["dtype"]))
        r["vs_best_sdpa"] = round(ref / r["ms"], 2) if ref and r["ms"] > 0 else None
    return rows


def e2e_summary(out: pathlib.Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """End-to-end rows and targets, as ``end_to_end.json`` holds them."""
    report = _load(out / "end_to_end.json") or {}
    return report.get("rows", []), report.get("targets", [])


def _f(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def to_markdown(summary: dict[str, Any]) -> str:
    """The summary as the table ``gpu_check.md`` holds and the run prints last."""
    env = summary["env"]
    lines = [f"# attnopt GPU check: {env.get('device')}", "",
             f"{summary['date']}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
             f"{env.get('transformers')}, driver {env.get('driver')}; wall {summary['wall_s']:.0f} s", "",
             "| phase | status | wall s | result |", "|---|---|---|---|"]  # fmt: skip
    for p in summary["phases"]:
        lines.append(f"| {p['phase']} | {p['status']} | {p['wall_s']} | {p.get('result', '')} |")
    if summary["kernels"]:
        lines += ["", "| kernel | N | mask | ms | TF(dense-eq) | TF(useful) | vs best SDPA | rel err |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in summary["kernels"]:
            lines.append(f"| {r['name']} | {r['n']} | {r['mask']} | {r['ms']} | {r['tflops_dense_equiv']} | "
                         f"{r['tflops_useful']} | {_f(r.get('vs_best_sdpa'))} | {_f(r.get('rel_err'), '.4f')} |")  # fmt: skip
    if summary["e2e"]:
        lines += ["", "| config | N | status | attention ms | forward ms | attention vs fastest dense | "
                  "predicted | plan s | families |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in summary["e2e"]:
            fams = ", ".join(f"{k} {v}" for k, v in (r.get("families") or {}).items())
            lines.append(f"| {r['config']} | {r['n']} | {r['status']} | {_f(r.get('attention_ms'))} | "
                         f"{_f(r.get('forward_ms'))} | {_f(r.get('measured_speedup'))} | "
                         f"{_f(r.get('predicted_speedup'))} | {_f(r.get('plan_s'), '.1f')} | {fams} |")  # fmt: skip
    for t in summary["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t.get("met")]
        lines.append(f"- {t['config']} at N={t['n']}: {t['target']}: {verdict} "
                     f"({_f(t.get('measured'))}{'; ' + t['why'] if t.get('why') else ''})")  # fmt: skip
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """Device, driver and package versions (every field optional: this must never fail)."""
    env: dict[str, Any] = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is a fact to record
            env[mod] = None
    try:
        import torch

        env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    except Exception as e:  # noqa: BLE001
        env["device"] = f"unknown ({type(e).__name__})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
        env["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the phases, write ``gpu_check.{json,md,log}`` and return the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True, help="results folder ($OUT on the device)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--only", nargs="+", choices=PHASES, default=list(PHASES), help="phases to run")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile end-to-end rows")
    ap.add_argument("--dry-run", action="store_true", help="print the phase commands and stop")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out: pathlib.Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    env = environment()
    print(json.dumps(env), flush=True)
    if env.get("device") == "no CUDA device" and not args.dry_run:
        sys.exit(
            "gpu_check.py: no CUDA device; the CPU checks are `make test` and the benchmarks' --smoke runs."
        )
    phases = []
    for name in args.only:
        left = args.deadline - (time.perf_counter() - t0) - RESERVE_S
        timeout = min(PHASE_CAPS[name], left)
        # end_to_end.py starts no configuration after its --time-limit; keep room for the one in flight
        cmds = phase_commands(out, compile_e2e=args.compile, e2e_time_limit=max(timeout - 100.0, 30.0))
        if args.dry_run:
            print(name, " ".join(cmds[name]))
            continue
        if timeout < 20:
            phases.append({"phase": name, "status": "skipped (deadline)", "rc": None, "wall_s": 0.0})
            continue
        print(f"[{time.perf_counter() - t0:5.0f} s] {name} (up to {timeout:.0f} s)", flush=True)
        res = run_phase(name, cmds[name], timeout, log)
        if name == "tests":
            counts = pytest_counts(_phase_log(log, name))
            res["counts"] = counts
            res["result"] = ", ".join(f"{v} {k}" for k, v in counts.items())
        phases.append(res)
        print(
            f"[{time.perf_counter() - t0:5.0f} s] {name}: {res['status']} {res.get('result', '')}", flush=True
        )
    kernels = kernel_summary(out)
    e2e_rows, targets = e2e_summary(out)
    for p in phases:
        if p["phase"] == "kernels":
            p["result"] = f"{len(kernels)} rows"
        if p["phase"] == "e2e":
            p["result"] = (
                f"{sum(r.get('status') == 'ok' for r in e2e_rows)}/{len(e2e_rows)} configurations ok"
            )
    summary = {
        "benchmark": "gpu_check", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "env": env, "phases": phases, "wall_s": time.perf_counter() - t0,
        "kernels": kernels, "e2e": [{k: v for k, v in r.items() if k != "traceback"} for r in e2e_rows],
        "targets": targets,
    }  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    md = to_markdown(summary)
    (out / "gpu_check.md").write_text(md)
    if not args.dry_run:
        print(md)
        for r in e2e_rows:
            if r.get("traceback"):
                print(f"--- {r['config']} N={r['n']}:\n{r['traceback'][-1200:]}")
    return summary


if __name__ == "__main__":
    main()
