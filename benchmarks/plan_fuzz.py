"""Fuzz plan loading at scale: mutate a saved plan many times and count what load_plan did.

Every mutation must be refused with a one-line ValueError/FileNotFoundError, be harmless (the
plan loads equal to the original), or — for crafted plans whose hashes were re-signed — load
faithfully; anything else is a failure (expected: 0). Writes benchmarks/results/plan_fuzz.json
and .md. Usage: ``python benchmarks/plan_fuzz.py [--count 2000] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import safetensors  # noqa: E402
import torch  # noqa: E402

import attnopt  # noqa: E402
from tests.cost_model.plan_mutations import KINDS, build_plan, run_one  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = {k: {"tried": 0, "refused": 0, "harmless": 0, "faithful": 0, "failures": 0} for k in KINDS}
    failures = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        root = pathlib.Path(root)
        plan = build_plan()
        plan.save(root / "template")
        for i in range(args.count):
            kind, seed = KINDS[i % len(KINDS)], rng.randrange(2**32)
            c = counts[kind]
            c["tried"] += 1
            try:
                c[run_one(kind, seed, root / "template", root / "work", plan)] += 1
            except Exception as e:  # noqa: BLE001 - a failure is what this script counts
                c["failures"] += 1
                failures.append({"kind": kind, "seed": seed, "error": f"{type(e).__name__}: {e}"[:300]})
    total = {k: sum(c[k] for c in counts.values()) for k in ("tried", "refused", "harmless", "faithful", "failures")}
    result = {
        "date": datetime.date.today().isoformat(),
        "versions": {
            "attnopt": getattr(attnopt, "__version__", "?"), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(),
        },  # fmt: skip
        "count": args.count,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 2),
        "per_kind": counts,
        "total": total,
        "failures": failures,
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Plan loading fuzz",
        "",
        f"{result['date']}; attnopt {result['versions']['attnopt']}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, Python {platform.python_version()}; "
        f"{args.count} mutations (seed {args.seed}) in {result['seconds']} s.",
        "",
        "refused: ValueError/FileNotFoundError with a one-line message; harmless: loaded equal to the original; "
        "faithful: a re-signed crafted plan loaded exactly as its file states.",
        "",
        "| kind | tried | refused | harmless | faithful | failures |",
        "|---|---|---|---|---|---|",
    ]
    for k, c in [*counts.items(), ("**total**", total)]:
        lines.append(f"| {k} | {c['tried']} | {c['refused']} | {c['harmless']} | {c['faithful']} | {c['failures']} |")
    (out / "plan_fuzz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
