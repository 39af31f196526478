"""Coverage benchmark: how many attention sites Inductor's ``fuse_attention`` and attnopt find.

For every zoo model with eager attention (the Hugging Face ``*-eager`` entries and the
``torch.nn`` / hand-written ones; ``*-sdpa`` entries already call SDPA, so there is nothing
for Inductor to fuse), this script counts

* the sites truly present (the zoo's expectations, cross-checked by ``tests/patterns/test_zoo.py``),
* the sites Inductor rewrites to SDPA under ``torch.compile`` (default backend), read from
  ``torch._dynamo.utils.counters["inductor"]["fuse_attention"]`` reset per model, under
  ``torch.no_grad()`` (the inference graph) and, for the models named by ``--grad``, with grad
  enabled (the joint forward/backward graph, which Inductor pattern-matches separately),
* the rewritable sites ``attnopt.find_sites`` reports (when attnopt has it).

It writes ``benchmarks/results/coverage.json`` and ``coverage.md`` (device, versions, date).

Usage::

    python benchmarks/coverage.py            # the whole eager zoo (~20-40 min on 2 busy CPU cores)
    python benchmarks/coverage.py --quick    # four models, table to stdout only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import pathlib
import platform
import sys
import time
import warnings
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.zoo import ZOO, ZooModel  # noqa: E402

__all__ = ["count_attnopt", "count_inductor", "main", "select_models"]

RESULTS = ROOT / "benchmarks" / "results"
QUICK = ("gpt2-eager", "bert-eager", "nanogpt", "torch-encoder")
#: Models also compiled with grad enabled by default (the joint graph takes ~2x as long to compile).
GRAD_DEFAULT = (
    "gpt2-eager",
    "llama-eager",
    "bert-eager",
    "vit-eager",
    "t5-eager",
    "nanogpt",
    "torch-encoder",
)
log = logging.getLogger("coverage")


def select_models(quick: bool) -> list[ZooModel]:
    """Eager-attention zoo entries (negatives included: they must stay at 0)."""
    models = [z for z in ZOO if z.attn_implementation in (None, "eager")]
    if quick:
        models = [z for z in models if z.name in QUICK]
    return models


def count_inductor(entry: ZooModel, grad: bool) -> dict[str, Any]:
    """Sites Inductor's ``fuse_attention`` rewrites when compiling ``entry`` on CPU.

    Returns ``{"found": int | None, "seconds": float, "error": str | None}``.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    # A compile served from Inductor's FX-graph cache (or AOTAutograd's cache) skips the
    # pattern-matcher passes, so the counter would read 0 for any model compiled before.
    inductor_config.fx_graph_cache = False
    inductor_config.fx_graph_remote_cache = False
    functorch_config.enable_autograd_cache = False
    torch._dynamo.reset()
    counters.clear()
    model, args, kwargs = entry.build()
    if grad:
        for p in model.parameters():
            p.requires_grad_(True)
    start = time.perf_counter()
    error = None
    try:
        compiled = torch.compile(model)
        with torch.set_grad_enabled(grad):
            compiled(*args, **kwargs)
    except Exception as e:  # a compile failure is a result, not a crash of the benchmark
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    seconds = time.perf_counter() - start
    found = int(counters["inductor"]["fuse_attention"])
    torch._dynamo.reset()
    return {"found": None if error else found, "seconds": round(seconds, 2), "error": error}


def count_attnopt(entry: ZooModel) -> dict[str, Any]:
    """Sites ``attnopt.find_sites`` reports for ``entry`` (all and rewritable)."""
    try:
        from attnopt import find_sites  # type: ignore[attr-defined]
    except ImportError:
        return {"found": None, "rewritable": None, "error": "attnopt.find_sites not available"}
    model, args, kwargs = entry.build()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sites = find_sites(model, *args, **kwargs)
    except Exception as e:
        return {"found": None, "rewritable": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"found": len(sites), "rewritable": sum(1 for s in sites if s.rewritable), "error": None}


def _environment() -> dict[str, Any]:
    import transformers

    return {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": "float32",
        "backend": "torch.compile default (inductor)",
    }


def _fmt(result: dict[str, Any]) -> str:
    if result["found"] is not None:
        return str(result["found"])
    return "error" if result.get("error") else "-"


def _markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Attention sites found: Inductor `fuse_attention` vs attnopt",
        "",
        f"Device: {env['device']}; torch {env['torch']}; transformers {env['transformers']}; "
        f"{env['dtype']}; {env['date']}. Generated by `benchmarks/coverage.py`.",
        "",
        "`present` = sites in the model (zoo expectations; `rewritable` in brackets when some are "
        "not, e.g. T5's relative-position bias). `Inductor` = `counters['inductor']['fuse_attention']` "
        "after one compiled call, inference (`no_grad`) and with grad enabled. `attnopt` = rewritable "
        "sites reported by `attnopt.find_sites`.",
        "",
        "| model | present | Inductor (no_grad) | Inductor (grad) | attnopt |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        present = f"{r['present']}" + (f" ({r['rewritable']})" if r["rewritable"] != r["present"] else "")
        att = r["attnopt"]
        lines.append(
            f"| {r['model']} | {present} | {_fmt(r['inductor_no_grad'])} | "
            f"{_fmt(r['inductor_grad'])} | {'n/a' if att['found'] is None else att['rewritable']} |"
        )
    tot = {
        k: sum((r[k]["found"] or 0) for r in rows if k != "attnopt")
        for k in ("inductor_no_grad", "inductor_grad")
    }
    present = sum(r["present"] for r in rows)
    rewritable = sum(r["rewritable"] for r in rows)
    att_total = sum((r["attnopt"]["rewritable"] or 0) for r in rows)
    lines.append(
        f"| **total** | {present} ({rewritable}) | {tot['inductor_no_grad']} | {tot['inductor_grad']} | {att_total} |"
    )
    lines += [
        "",
        "Notes: `-` = not compiled with grad enabled (see `--grad`). The `torch-*` models call "
        "`nn.MultiheadAttention` with `need_weights=False`, which already runs SDPA, so Inductor's 0 there "
        "means nothing left to fuse, not a miss; attnopt's count is the sites it can take over. T5's "
        "self-attention sites carry a learned relative-position bias and are not rewritable; its "
        "cross-attention adds an all-zero bias. Inductor's FX-graph and AOTAutograd caches are disabled "
        "while counting (a cache hit skips the pattern matcher and reads 0).",
    ]
    errors = [
        (r["model"], k, r[k]["error"])
        for r in rows
        for k in ("inductor_no_grad", "inductor_grad", "attnopt")
        if r[k].get("error")
    ]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {m} / {k}: {e}" for m, k, e in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument(
        "--grad",
        default=",".join(GRAD_DEFAULT),
        help="comma-separated models also compiled with grad enabled ('all', or '' for none)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="results folder (default benchmarks/results; --quick: none)",
    )
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    out = opts.out if opts.out is not None or opts.quick else RESULTS
    env = _environment()
    rows = []
    for entry in select_models(opts.quick):
        infer = count_inductor(entry, grad=False)
        wants_grad = opts.grad == "all" or entry.name in opts.grad.split(",")
        grad = count_inductor(entry, True) if wants_grad else {"found": None, "seconds": 0.0, "error": None}
        att = count_attnopt(entry)
        row = {
            "model": entry.name,
            "group": entry.group,
            "present": entry.num_sites,
            "rewritable": entry.num_rewritable,
            "inductor_no_grad": infer,
            "inductor_grad": grad,
            "attnopt": att,
        }
        rows.append(row)
        log.info(
            "%-24s present=%d inductor(no_grad)=%s inductor(grad)=%s attnopt=%s  (%.0fs+%.0fs)",
            entry.name,
            entry.num_sites,
            infer["found"],
            grad["found"],
            att["rewritable"],
            infer["seconds"],
            grad["seconds"],
        )
        if out is not None:  # written after every model so a long run leaves partial results
            _write(out, env, rows)
    print(_markdown(env, rows))
    return 0


def _write(out: pathlib.Path, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``coverage.json`` and ``coverage.md`` under ``out`` (``--quick`` alone writes nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (out / "coverage.md").write_text(_markdown(env, rows))


if __name__ == "__main__":
    raise SystemExit(main())
