"""The fuzzed-matching properties at scale: many generated attention spellings, counted, not asserted.

``tests/patterns/test_fuzz_spellings.py`` runs a few hundred examples in CI; this script runs the
same three checks of :mod:`tests.spellings` on many more and commits what happened:

* **found**: ``find_sites`` reports exactly the one site built, with its heads, KV heads, head
  dim, causality, window, mask kind and scale, and marks it rewritable;
* **rewritten exactly**: the site is replaced by ``attnopt::exact`` and the output on fresh inputs
  meets FlashAttention's rule (error to a float64 copy at most twice the model's own + a floor);
* **negatives rejected**: a softmax that is not attention (scores against a weight, the query
  axis, ``Pᵀ·V``, ``P·P``, ``P·W``) is never reported rewritable and ``optimize`` leaves its output
  bit for bit.

Examples come from hypothesis's generator with a fixed seed (generate phase only: no shrinking,
every draw counted once). Also recorded: how often each value of each axis was drawn, so the
coverage is visible. Writes ``benchmarks/results/fuzz_spellings.{json,md}``.

Usage: ``python benchmarks/fuzz_spellings.py [--found 3000] [--rewrite 600] [--negatives 500]
[--seed 0]``; ``--smoke`` runs a handful of each into a temporary folder (the CI smoke test).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import pathlib
import platform
import sys
import time
import warnings
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hypothesis  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnopt  # noqa: E402
from tests.spellings import NEGATIVES, check_found, check_negative, check_rewrite, spellings  # noqa: E402

#: Failures kept in the JSON per property (all are counted).
MAX_LISTED = 50


@dataclasses.dataclass
class Tally:
    """What one property saw: examples tried, passed, failed (the first few listed; a crash counts as a
    failure), the values drawn per axis, and time."""

    tried: int = 0
    passed: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = dataclasses.field(default_factory=list)
    axes: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)

    def record(self, spec, problem: str | None, kind: str | None = None) -> None:
        self.tried += 1
        for axis, value in dataclasses.asdict(spec).items():
            if axis == "gqa" and spec.kv_heads == spec.heads:
                value = "none (MHA)"  # the GQA form is only spelled when KV heads are shared
            self.axes.setdefault(axis, collections.Counter())[str(value)] += 1
        if kind is not None:
            self.axes.setdefault("negative", collections.Counter())[kind] += 1
        if problem is None:
            self.passed += 1
            return
        self.failed += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append({"spelling": spec.describe(), "kind": kind or "", "problem": problem[:300]})

    def to_json(self) -> dict:
        return {
            "tried": self.tried, "passed": self.passed, "failed": self.failed,
            "seconds": round(self.seconds, 1), "failures": self.failures,
            "axes": {a: dict(sorted(c.items())) for a, c in self.axes.items()},
        }  # fmt: skip


def _checked(check: Callable[..., str | None], *args) -> str | None:
    """``check(*args)``, with an exception counted as a failure naming it (never a crash)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check(*args)
    except Exception as e:  # noqa: BLE001 - a crash inside attnopt is a failure this script reports
        return f"raised {type(e).__name__}: {e}"


def run(count: int, seed: int, strategy, body) -> float:
    """Feed ``count`` draws of ``strategy`` (hypothesis, seeded, generate phase only) to ``body``."""
    start = time.perf_counter()
    if count <= 0:
        return 0.0

    @hypothesis.seed(seed)
    @settings(
        max_examples=count, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def property_(draw) -> None:
        body(draw)

    property_()
    return time.perf_counter() - start


def fuzz(found: int, rewrite: int, negatives: int, seed: int) -> dict[str, Tally]:
    """Run the three properties; one :class:`Tally` each."""
    tallies = {"found": Tally(), "rewritten_exactly": Tally(), "negatives_rejected": Tally()}

    t = tallies["found"]
    t.seconds = run(found, seed, spellings(), lambda spec: t.record(spec, _checked(check_found, spec)))
    r = tallies["rewritten_exactly"]
    r.seconds = run(rewrite, seed + 1, spellings(), lambda spec: r.record(spec, _checked(check_rewrite, spec)))
    n = tallies["negatives_rejected"]

    def negative(draw) -> None:
        kind, spec = draw
        n.record(spec, _checked(check_negative, kind, spec), kind)

    n.seconds = run(negatives, seed + 2, st.tuples(st.sampled_from(NEGATIVES), spellings()), negative)
    return tallies


def _device() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(result: dict, out: pathlib.Path) -> None:
    """``fuzz_spellings.json`` and a Markdown table beside it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz_spellings.json").write_text(json.dumps(result, indent=2) + "\n")
    v = result["versions"]
    lines = [
        "# Fuzzed attention spellings",
        "",
        f"{result['date']}; {result['device']}; attnopt {v['attnopt']}, torch {v['torch']}, "
        f"hypothesis {v['hypothesis']}, Python {v['python']}; seed {result['seed']}.",
        "",
        "Generated by `tests/spellings.py` (layouts, scale forms, masks, softmax forms, upcast, dim, dropout, "
        "GQA forms, self/cross, fp32/bf16); checks as in `tests/patterns/test_fuzz_spellings.py`.",
        "",
        "| property | examples | passed | failed | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in result["properties"].items():
        lines.append(f"| {name.replace('_', ' ')} | {t['tried']} | {t['passed']} | {t['failed']} | {t['seconds']} |")
    lines += ["", "## Coverage (draws per value, all properties)", ""]
    merged: dict[str, collections.Counter] = {}
    for t in result["properties"].values():
        for axis, counts in t["axes"].items():
            merged.setdefault(axis, collections.Counter()).update(counts)
    for axis in ("layout", "scale", "mask", "softmax", "gqa", "dropout", "dtype", "cross", "upcast",
                 "positive_dim", "fill", "negative"):  # fmt: skip
        if axis in merged:
            lines.append(f"- **{axis}**: " + ", ".join(f"{k} {c}" for k, c in sorted(merged[axis].items())))
    failures = [(n, f) for n, t in result["properties"].items() for f in t["failures"]]
    lines += ["", "## Failures", ""]
    lines += [f"- {n}: {f['kind'] + ' at ' if f['kind'] else ''}{f['spelling']}: {f['problem']}" for n, f in failures]
    if not failures:
        lines.append("None.")
    (out / "fuzz_spellings.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--found", type=int, default=3000)
    ap.add_argument("--rewrite", type=int, default=600)
    ap.add_argument("--negatives", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="3 examples of each into --out (CI's plumbing check)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.found = args.rewrite = args.negatives = 3
    start = time.perf_counter()
    tallies = fuzz(args.found, args.rewrite, args.negatives, args.seed)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": _device(),
        "versions": {
            "attnopt": getattr(attnopt, "__version__", "?"), "torch": torch.__version__,
            "hypothesis": hypothesis.__version__, "python": platform.python_version(),
        },  # fmt: skip
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "properties": {name: t.to_json() for name, t in tallies.items()},
    }
    write(result, args.out)
    for name, t in tallies.items():
        print(f"{name:20s} {t.passed}/{t.tried} passed, {t.failed} failed ({t.seconds:.0f} s)")
    return result


if __name__ == "__main__":
    main()
