"""End-to-end GPU proof (issue 7): a ~1B Llama prefill with attnopt against the best dense baselines.

Model: ``transformers.LlamaForCausalLM`` with random (seeded) weights, 16 layers, hidden 2048, 32 heads,
8 KV heads, head dim 64, intermediate 8192, vocab 32000 (~1.1B parameters), bf16,
``attn_implementation="sdpa"``; one sequence of N random tokens, ``use_cache=False`` (prefill).

Configurations, each on a fresh copy of the same base weights (``optimize`` mutates in place):

* ``default``: the model as given (PyTorch's default SDPA dispatch);
* ``sdpa_forced``: SDPA forced with ``torch.nn.attention.sdpa_kernel`` to the fastest backend on this
  device. The backends FLASH_ATTENTION, CUDNN_ATTENTION and EFFICIENT_ATTENTION are timed first on the
  model's own first SDPA call (layer 0's q/k/v and flags, captured at N), and the fastest is used;
  every backend's time, or why it could not run, is recorded (``n/a`` on CPU);
* ``inductor``: ``torch.compile(model, dynamic=False)`` (Inductor, default SDPA dispatch);
* ``attnopt_<b>``: ``attnopt.optimize(model, budget=b, calib=...)`` for b in 2x, 4x, with calibration on
  2 random-token sequences of the same length (``{"input_ids": ..., "use_cache": False}``); the timing
  input is a third, different sequence;
* ``attnopt_<b>_compile``: the plan ``attnopt_<b>`` made, under
  ``torch.compile(model, backend=attnopt.backend(plan=plan), dynamic=False)`` on a fresh copy.

Order: all non-compiled configurations at every N first (N in ``--lengths`` order; the default puts
32768, where the targets are, first), then the compiled ones, so the 8-minute budget of one device call
is spent on the targets first. ``--time-limit`` skips (and records) what would start after it; results are
rewritten after every configuration, so a run cut short keeps what it measured. An out-of-memory error
(N=65536 may not fit) is recorded as a skipped row (``status: "oom"``); any other failure of a
configuration is recorded with its message (``status: "error"``) and the run goes on. Planning time on
the GPU is not known in advance, so all three lengths with compilation may not fit 8 minutes: the time
limit (450 s) then skips what is left, and ``--lengths`` / ``--no-compile`` narrow the run.

Per configuration:

* **attention time** (``attention_ms``), from one forward under ``torch.profiler`` after warm-up. Rule:
  an *attention op* is a profiler event named ``aten::scaled_dot_product_attention``, any
  ``aten::_scaled_dot_product_*`` backend (flash, cuDNN, efficient, flash-for-CPU, ...),
  ``aten::_flash_attention_*`` / ``aten::_efficient_attention_*`` / ``aten::_cudnn_attention_*``, or any
  ``attnopt::*`` operator (``attnopt::exact`` included: a site the plan keeps exact, or a head-pruned
  site, runs ``attnopt::exact``). Only *outermost* attention ops are summed: an attention op with an
  attention op among its profiler ancestors (e.g. the flash backend under
  ``aten::scaled_dot_product_attention``, or SDPA under ``attnopt::exact``) is not counted, nor is one
  whose time range lies inside an outermost attention op of another thread (attnopt's CPU kernels run
  SDPA on a worker pool), nor one run while dynamo traces (an ancestor region ``(dynamo_timed)``). An op's
  time is its device (CUDA) time including the kernels of its children (``device_time_total``) on GPU,
  its wall time on the calling thread (``cpu_time_total``) on CPU. ``attention_ops`` counts the outermost
  ops by name, so one can see which operators ran. As a check of the profiler's kernel attribution,
  ``profiler_check`` holds the device time of all kernels and the part attributed to some op.
* **whole-forward time** (``forward_ms``): median of ``--reps`` forwards after ``--warmup`` warm-up
  calls (the first call, which compiles where anything compiles, is timed separately as
  ``first_call_s``), CUDA events on GPU, ``perf_counter`` on CPU, synchronised.
* **peak memory**: ``torch.cuda.max_memory_allocated`` over the timed forwards (``peak_mem_gib``,
  weights included; one model is on the GPU at a time, the base weights wait on the CPU) and its excess
  over what was allocated before them (``peak_extra_gib``: activations and outputs); None on CPU.
* attnopt rows: the plan's chosen families (counts per family, and per site), planning time, feasibility,
  explanation and validation steps; **predicted** attention speedup (``plan.totals["speedup"]``) and
  **measured** speedup = attention time of the fastest dense baseline at that N (the smallest
  ``attention_ms`` among ``default``, ``sdpa_forced`` and ``inductor`` rows that ran) / this row's
  attention time; ``prediction_rel_err`` = predicted / measured - 1.
* every row: ``attention_vs_default`` and ``forward_vs_default`` = default time / this row's time (>1 is
  faster), and ``logits_rel_err`` = relative L2 difference of 256 sampled positions' logits from the
  default configuration's, a sanity check only.

Accuracy is not measured here: random weights have no meaningful quality metric. The accuracy side
(perplexity / bits per byte, embedding cosine on trained models under each budget) is
``benchmarks/planning.py`` (and ``benchmarks/families.py`` per family).

Targets recorded (at ``--target-n``, default 32768): attention time of ``attnopt_2x`` >= 2x and of
``attnopt_4x`` >= 4x faster than the fastest dense baseline, and each plan's predicted speedup within 20%
of the measured one; the same for the ``_compile`` variants. Each is marked met / MISSED with its numbers,
or "not measured" with the reason. (``--smoke`` checks them at its N=256, for the structure only.)

Writes ``end_to_end.json`` and ``end_to_end.md`` (device, torch/triton/transformers/attnopt versions, UTC
date) into ``--out`` (default ``benchmarks/results/``).

Usage::

    python benchmarks/end_to_end.py --out $OUT                # GPU, N in 32768 8192 65536, ~8 min budget
    python benchmarks/end_to_end.py --lengths 8192 32768      # choose N
    python benchmarks/end_to_end.py --smoke --out /tmp/e2e    # CPU, tiny Llama, N=256, fp32, 1 rep, 1 thread (CI)
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime as dt
import gc
import json
import logging
import math
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnopt  # noqa: E402

__all__ = ["ATTENTION_OP_PREFIXES", "is_attention_op", "attention_time", "main"]

RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = ("2x", "4x")
DENSE = ("default", "sdpa_forced", "inductor")
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
#: Profiler event names (prefixes) that are attention; see the module docstring for the counting rule.
ATTENTION_OP_PREFIXES = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_",
    "aten::_flash_attention_",
    "aten::_efficient_attention_",
    "aten::_cudnn_attention_",
    "attnopt::",
)
PREDICTION_TOLERANCE = 0.20
SAMPLED_POSITIONS = 256
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)

FULL_MODEL = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64,
)  # fmt: skip
SMOKE_MODEL = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32,
)  # fmt: skip

log = logging.getLogger("end_to_end")


# -- attention time from a profile ------------------------------------------------------------------


def is_attention_op(name: str) -> bool:
    """Whether a profiler event name is an attention op (see :data:`ATTENTION_OP_PREFIXES`)."""
    return name.startswith(ATTENTION_OP_PREFIXES)


def _ancestors(event) -> Any:
    p = event.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def attention_time(events, device_type: str) -> dict[str, Any]:
    """Attention time of one profiled forward: outermost attention ops only (module docstring rule).

    Args:
        events: ``prof.events()`` of a ``torch.profiler.profile`` run.
        device_type: ``"cuda"`` (sum device time incl. children's kernels) or ``"cpu"`` (wall time).

    Returns:
        ``{"ms", "calls", "ops": {name: count}}``.
    """
    from torch.autograd import DeviceType

    candidates = []
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async or not is_attention_op(e.name):
            continue
        if any(is_attention_op(a.name) or a.name.endswith("(dynamo_timed)") for a in _ancestors(e)):
            continue
        candidates.append(e)
    # Outermost across threads: drop ops inside another thread's attention op (worker pools).
    candidates.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
    outer: list[Any] = []
    for e in candidates:
        inside = any(
            o.thread != e.thread
            and o.time_range.start <= e.time_range.start
            and e.time_range.end <= o.time_range.end
            for o in outer
        )
        if not inside:
            outer.append(e)
    if device_type == "cuda":
        total_us = sum(e.device_time_total for e in outer)
    else:
        total_us = sum(e.cpu_time_total for e in outer)
    return {
        "ms": total_us / 1e3,
        "calls": len(outer),
        "ops": dict(sorted(collections.Counter(e.name for e in outer).items())),
    }


def _profiler_check(events) -> dict[str, float]:
    """Device time of all kernels vs the part the profiler attributed to some CPU op (CUDA only)."""
    from torch.autograd import DeviceType

    total = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA)
    attributed = sum(
        k.duration for e in events if e.device_type == DeviceType.CPU and not e.is_async for k in e.kernels
    )
    return {"device_total_ms": total / 1e3, "attributed_ms": attributed / 1e3}


# -- model, inputs, timing -----------------------------------------------------------------------------


def build_base_model(spec: dict[str, int], max_len: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The random-weight Llama (seeded, initialised on ``device``), returned on the CPU in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**spec, max_position_embeddings=max(max_len, 2048), attn_implementation="sdpa")
    torch.manual_seed(seed)
    try:
        with torch.device(device):  # random init on the GPU is seconds, on the CPU a minute at 1B
            # as from_pretrained(dtype=...) builds it: weights in dtype, RoPE's inv_freq kept in float32
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - fall back to the CPU rather than lose the run
        log.warning("building the model on %s failed (%s); building it on the CPU", device, e)
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.to("cpu").eval()


def make_call(n: int, vocab: int, seed: int, device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (1, n), generator=g).to(device), "use_cache": False}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], device: str, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def _cleanup(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


# -- the SDPA backend probe ----------------------------------------------------------------------------


class _Captured(Exception):
    pass


def _first_sdpa_call(model, call: dict[str, Any]) -> tuple[tuple, dict]:
    """The model's first ``F.scaled_dot_product_attention`` call (layer 0), captured, forward aborted."""
    from torch.overrides import TorchFunctionMode

    class Capture(TorchFunctionMode):
        got: tuple[tuple, dict] | None = None

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                self.got = (args, kwargs)
                raise _Captured
            return func(*args, **kwargs)

    mode = Capture()
    try:
        with torch.no_grad(), mode:
            model(**call)
    except _Captured:
        pass
    if mode.got is None:
        raise RuntimeError("Expected the model to call F.scaled_dot_product_attention, but it did not.")
    return mode.got


def probe_sdpa_backends(model, call: dict[str, Any], device: str, reps: int) -> dict[str, Any]:
    """Time each SDPA backend (and the default dispatch) on the model's own layer-0 SDPA call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args, kwargs = _first_sdpa_call(model, call)
    q = args[0]
    shapes = {
        "q": list(q.shape), "k": list(args[1].shape), "v": list(args[2].shape), "dtype": str(q.dtype),
        **{k: (list(v.shape) if torch.is_tensor(v) else v) for k, v in kwargs.items()},
    }  # fmt: skip
    result: dict[str, Any] = {"call": shapes, "backends": {}}

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(*args, **kwargs)

    with torch.no_grad():
        for name in ("DEFAULT", *SDPA_BACKENDS):
            try:
                if name == "DEFAULT":
                    run()
                    _sync(device)
                    times = _time_ms(run, device, reps)
                else:
                    with sdpa_kernel([getattr(SDPBackend, name)]):
                        run()
                        _sync(device)
                        times = _time_ms(run, device, reps)
                result["backends"][name] = {"ms": statistics.median(times), "error": None}
            except Exception as e:  # noqa: BLE001 - a backend that cannot serve this call is recorded
                msg = " ".join(str(e).split())[:300]
                result["backends"][name] = {"ms": None, "error": f"{type(e).__name__}: {msg}"}
    ran = {k: v["ms"] for k, v in result["backends"].items() if k != "DEFAULT" and v["ms"] is not None}
    result["fastest"] = min(ran, key=ran.get) if ran else None
    return result


# -- one configuration ---------------------------------------------------------------------------------


class Context:
    """What the configurations share: settings, the base model on the CPU, inputs, plans, report."""

    def __init__(self, args: argparse.Namespace, base, spec: dict[str, int]) -> None:
        self.args = args
        self.device: str = args.device
        self.base = base
        self.spec = spec
        self.calls: dict[int, dict[str, Any]] = {}
        self.calib: dict[int, list[dict[str, Any]]] = {}
        self.plans: dict[tuple[int, str], Any] = {}
        self.reference: dict[int, torch.Tensor] = {}
        self.sdpa: dict[int, dict[str, Any]] = {}
        self.t0 = time.perf_counter()

    def fresh(self):
        """A fresh copy of the base model on the device."""
        return copy.deepcopy(self.base).to(self.device)

    def inputs(self, n: int) -> None:
        if n not in self.calls:
            vocab = self.spec["vocab_size"]
            self.calls[n] = make_call(n, vocab, seed=0, device=self.device)
            self.calib[n] = [make_call(n, vocab, seed=s, device=self.device) for s in (1, 2)]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, OOM_ERRORS) or "out of memory" in str(e).lower()


def _sample_positions(n: int, device: str) -> torch.Tensor:
    return torch.linspace(0, n - 1, min(SAMPLED_POSITIONS, n), device=device).long()


def measure(ctx: Context, row: dict[str, Any], n: int, run: Callable[[], Any]) -> None:
    """Fill ``row`` with the first-call time, sanity error, forward times, memory and attention time."""
    from torch.profiler import ProfilerActivity, profile

    device, args = ctx.device, ctx.args
    with torch.no_grad():
        _sync(device)
        t = time.perf_counter()
        out = run()
        _sync(device)
        row["first_call_s"] = time.perf_counter() - t
        sampled = _logits(out)[0, _sample_positions(n, device)].float()
        del out
        if row["config"] == "default":
            ctx.reference[n] = sampled
        ref = ctx.reference.get(n)
        row["logits_rel_err"] = (
            None if ref is None else float((sampled - ref).norm() / ref.norm().clamp_min(1e-12))
        )
        row["logits_finite"] = bool(torch.isfinite(sampled).all())
        del sampled
        for _ in range(max(args.warmup - 1, 0)):
            run()
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        times = _time_ms(run, device, args.reps)
        row["forward_ms"] = statistics.median(times)
        row["forward_ms_all"] = times
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            row["peak_mem_gib"] = peak / 2**30
            row["peak_extra_gib"] = (peak - before) / 2**30
        else:
            row["peak_mem_gib"] = row["peak_extra_gib"] = None
        graphs_before = _dynamo_graphs()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            run()
            _sync(device)
        events = prof.events()
        att = attention_time(events, device)
        row["attention_ms"] = att["ms"]
        row["attention_calls"] = att["calls"]
        row["attention_ops"] = att["ops"]
        row["recompiled_while_profiling"] = _dynamo_graphs() != graphs_before
        if device == "cuda":
            try:
                row["profiler_check"] = _profiler_check(events)
            except Exception as e:  # noqa: BLE001 - a diagnostic only
                row["profiler_check"] = {"error": f"{type(e).__name__}: {e}"}
        del prof, events


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _plan_fields(plan) -> dict[str, Any]:
    fams = collections.Counter(e.family for e in plan.entries)
    totals = dict(plan.totals)
    return {
        "families": dict(sorted(fams.items())),
        "plan_sites": {e.site: f"{e.family}({e.describe()})" for e in plan.entries},
        "predicted_speedup": totals.get("speedup"),
        "plan_totals": totals,
        "feasible": plan.feasible,
        "explanation": plan.explanation,
        "steps": list(plan.steps),
        "plan_timings": dict(plan.timings),
    }


def _build(ctx: Context, row: dict[str, Any], n: int, name: str) -> Callable[[], Any]:
    """Make configuration ``name`` on a fresh model copy; returns its forward (which holds the model)."""
    call, budget = ctx.calls[n], row["budget"]
    model = ctx.fresh()
    if name == "default":
        if ctx.device != "cuda":
            ctx.sdpa[n] = {"fastest": "n/a", "note": "SDPA backend forcing is n/a on CPU"}
        else:
            try:
                ctx.sdpa[n] = probe_sdpa_backends(model, call, ctx.device, reps=ctx.args.probe_reps)
            except Exception as e:  # noqa: BLE001 - the probe failing must not stop the baseline
                ctx.sdpa[n] = {"error": f"{type(e).__name__}: {e}", "fastest": None}
        return lambda: model(**call)
    if name == "sdpa_forced":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, row["sdpa_backend"])

        def forced() -> Any:
            with sdpa_kernel([backend]):
                return model(**call)

        return forced
    if name == "inductor":
        compiled = torch.compile(model, dynamic=False)
        return lambda: compiled(**call)
    if name.endswith("_compile"):
        plan = ctx.plans[(n, budget)]
        row.update(_plan_fields(plan))
        backend = attnopt.backend(plan=plan)
        row["_backend"] = backend
        compiled = torch.compile(model, backend=backend, dynamic=False)
        return lambda: compiled(**call)
    # attnopt_<budget>: optimize() rewrites this copy in place
    t = time.perf_counter()
    attnopt.optimize(model, budget=budget, calib=ctx.calib[n], progress=False)
    row["plan_s"] = time.perf_counter() - t
    plan = getattr(model, "_attnopt_plan", None)
    if plan is None:
        raise RuntimeError("attnopt.optimize installed no plan (it found no attention sites)")
    ctx.plans[(n, budget)] = plan
    row.update(_plan_fields(plan))
    row["plan_summary"] = plan.summary()
    return lambda: model(**call)


def _skip_reason(ctx: Context, row: dict[str, Any], n: int, name: str) -> tuple[str, str] | None:
    """(status, reason) when configuration ``name`` is not run at ``n``, else None."""
    limit = ctx.args.time_limit
    if limit and ctx.elapsed() > limit:
        return "skipped", f"time limit: {ctx.elapsed():.0f}s > --time-limit {limit:g}s"
    if name == "sdpa_forced" and ctx.device != "cuda":
        return "n/a", "SDPA backend forcing (flash/cuDNN/efficient) applies to CUDA only"
    if row["compiled"] and ctx.args.no_compile:
        return "skipped", "--no-compile (implied by --smoke)"
    if name == "sdpa_forced" and ctx.sdpa.get(n, {}).get("fastest") is None:
        return "skipped", "no SDPA backend ran in the probe (see sdpa_backends)"
    if name.endswith("_compile") and (n, row["budget"]) not in ctx.plans:
        return "skipped", f"no plan: attnopt_{row['budget']} at N={n} did not complete"
    return None


def run_config(ctx: Context, n: int, name: str) -> dict[str, Any]:
    """Build configuration ``name`` at length ``n``, measure it, and return its row (never raises)."""
    budget = name.split("_")[1] if name.startswith("attnopt_") else None
    row: dict[str, Any] = {
        "n": n, "config": name, "kind": "attnopt" if budget else "baseline", "budget": budget,
        "compiled": name == "inductor" or name.endswith("_compile"), "status": "ok", "reason": None,
    }  # fmt: skip
    skip = _skip_reason(ctx, row, n, name)
    if skip is not None:
        row["status"], row["reason"] = skip
        return row
    if name == "sdpa_forced":
        row["sdpa_backend"] = ctx.sdpa[n]["fastest"]
    ctx.inputs(n)
    run: Callable[[], Any] | None = None
    t_start = time.perf_counter()
    try:
        run = _build(ctx, row, n, name)
        measure(ctx, row, n, run)
    except Exception as e:  # noqa: BLE001 - one configuration failing must not stop the run
        oom = _is_oom(e)
        msg = " ".join(str(e).split())
        row.update(status="oom" if oom else "error", reason=f"{type(e).__name__}: {msg[:600]}")
        if not oom:
            row["traceback"] = traceback.format_exc()[-3000:]
        for key in ("forward_ms", "attention_ms"):
            row.pop(key, None)
    finally:
        backend = row.pop("_backend", None)
        if backend is not None:
            row["rewrites"] = list(getattr(backend, "compiles", []))
        row["setup_and_measure_s"] = time.perf_counter() - t_start
        run = None  # drops the model copy
        _cleanup(ctx.device)
    return row


# -- derived numbers, targets, report ------------------------------------------------------------------


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and _finite(row.get("attention_ms")) and _finite(row.get("forward_ms"))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def derive(rows: list[dict[str, Any]]) -> None:
    """Ratios vs the default dispatch and vs the fastest dense baseline, per N (in place)."""
    for n in sorted({r["n"] for r in rows}):
        at_n = [r for r in rows if r["n"] == n]
        default = next((r for r in at_n if r["config"] == "default" and _ok(r)), None)
        dense = [r for r in at_n if r["config"] in DENSE and _ok(r) and r["attention_ms"] > 0]
        fastest = min(dense, key=lambda r: r["attention_ms"]) if dense else None
        for r in at_n:
            for key in ("attention_vs_default", "forward_vs_default", "fastest_dense", "fastest_dense_ms",
                        "attention_vs_fastest_dense", "measured_speedup", "prediction_rel_err",
                        "prediction_within_tolerance"):  # fmt: skip
                r.pop(key, None)
            if not _ok(r):
                continue
            if default is not None:
                r["attention_vs_default"] = _ratio(default["attention_ms"], r["attention_ms"])
                r["forward_vs_default"] = _ratio(default["forward_ms"], r["forward_ms"])
            if fastest is not None:
                r["fastest_dense"] = fastest["config"]
                r["fastest_dense_ms"] = fastest["attention_ms"]
                measured = _ratio(fastest["attention_ms"], r["attention_ms"])
                r["attention_vs_fastest_dense"] = measured
                if r["kind"] == "attnopt":
                    r["measured_speedup"] = measured
                    pred = r.get("predicted_speedup")
                    if _finite(pred) and _finite(measured) and measured > 0:
                        r["prediction_rel_err"] = pred / measured - 1.0
                        r["prediction_within_tolerance"] = abs(pred / measured - 1.0) <= PREDICTION_TOLERANCE


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and _finite(a) and _finite(b) else None


def targets(rows: list[dict[str, Any]], target_n: int) -> list[dict[str, Any]]:
    """The issue's targets at ``target_n``, each met / missed / not measured, with its numbers."""
    out = []
    for budget in BUDGETS:
        goal = float(budget.rstrip("x"))
        for name in (f"attnopt_{budget}", f"attnopt_{budget}_compile"):
            row = next((r for r in rows if r["n"] == target_n and r["config"] == name), None)
            base = {"n": target_n, "config": name, "budget": budget}
            if row is None or not _ok(row) or row.get("measured_speedup") is None:
                why = (
                    f"N={target_n} not run" if row is None
                    else row.get("reason") or ("no dense baseline ran" if _ok(row) else row.get("status"))
                )  # fmt: skip
                out.append(
                    {**base, "target": f"attention >= {goal:g}x vs fastest dense", "met": None, "why": why}
                )
                out.append({**base, "target": "predicted within 20% of measured", "met": None, "why": why})
                continue
            measured = row["measured_speedup"]
            out.append({
                **base, "target": f"attention >= {goal:g}x vs fastest dense", "measured": measured,
                "threshold": goal, "vs": row.get("fastest_dense"), "met": bool(measured >= goal),
            })  # fmt: skip
            pred, err = row.get("predicted_speedup"), row.get("prediction_rel_err")
            out.append({
                **base, "target": "predicted within 20% of measured", "predicted": pred, "measured": measured,
                "rel_err": err, "threshold": PREDICTION_TOLERANCE,
                "met": None if err is None else bool(abs(err) <= PREDICTION_TOLERANCE),
                **({"why": "no predicted speedup in the plan"} if err is None else {}),
            })  # fmt: skip
    return out


def _fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if _finite(x) else "–"


def _params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def _status(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] == "oom":
        return "skipped (OOM)"
    return r["status"]


def to_markdown(report: dict[str, Any]) -> str:
    """The results table, the targets, the SDPA probe, plans and failures."""
    v, m = report["versions"], report["model"]
    lines = [
        f"# attnopt end to end: {m['name']} prefill on {report['device']}",
        "",
        f"{report['date']}; mode {report['mode']}; torch {v['torch']}, triton {v['triton']}, transformers "
        f"{v['transformers']}, attnopt {v['attnopt']}; {_params(m['params'])} parameters, {m['dtype']}, "
        f"{m['layers']} layers, {m['heads']} heads / {m['kv_heads']} KV, head dim {m['head_dim']}; one sequence, "
        f"use_cache=False; warm-up {report['timing']['warmup']}, median of {report['timing']['reps']} forwards; "
        f"{report['timing']['threads']} CPU threads; wall time {report['wall_s']:.0f}s.",
        "",
        "Attention ms: outermost attention ops of one profiled forward (SDPA and its backends, `attnopt::*`), "
        f"{'device (CUDA) time' if report['device_type'] == 'cuda' else 'CPU wall time'}; see the script's "
        "docstring for the exact rule. 'vs default' = default time / this time (>1 is faster); 'vs fastest "
        "dense' = the fastest dense baseline's attention time at that N / this time (the measured speedup); "
        "predicted = the plan's `totals['speedup']`. Peak GiB: max allocated over the timed forwards (one "
        "model on the device), in brackets its excess over what was allocated before them.",
        "",
        "| N | config | status | attention ms | attn vs default | attn vs fastest dense | predicted | "
        "forward ms | fwd vs default | peak GiB | families | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(report["configs"])}
    for r in sorted(report["rows"], key=lambda r: (r["n"], order.get(r["config"], 99))):
        name = r["config"] + (f" ({r['sdpa_backend']})" if r.get("sdpa_backend") else "")
        fams = ", ".join(f"{k} {c}" for k, c in (r.get("families") or {}).items()) or "–"
        peak = (
            "–" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.1f} (+{r['peak_extra_gib']:.1f})"
        )
        setup = r.get("plan_s", r.get("first_call_s"))
        lines.append(
            f"| {r['n']} | {name} | {_status(r)} | {_fmt(r.get('attention_ms'))} | "
            f"{_fmt(r.get('attention_vs_default'), suffix='x')} | "
            f"{_fmt(r.get('attention_vs_fastest_dense'), suffix='x')} | "
            f"{_fmt(r.get('predicted_speedup'), suffix='x')} | {_fmt(r.get('forward_ms'))} | "
            f"{_fmt(r.get('forward_vs_default'), suffix='x')} | {peak} | {fams} | {_fmt(setup, '.1f')} |"
        )
    lines += ["", f"## Targets (N={report['target_n']})", ""]
    lines += ["| target | config | numbers | result |", "|---|---|---|---|"]
    for t in report["targets"]:
        if t["met"] is None:
            nums, res = t.get("why", "–"), "not measured"
        elif "predicted" in t:
            nums = (f"predicted {_fmt(t['predicted'])}x vs measured {_fmt(t['measured'])}x "
                    f"({_fmt(100 * t['rel_err'], '+.0f')}%, limit ±{t['threshold']:.0%})")  # fmt: skip
            res = "met" if t["met"] else "**MISSED**"
        else:
            nums = f"{_fmt(t['measured'])}x vs {t.get('vs')} (need ≥ {t['threshold']:g}x)"
            res = "met" if t["met"] else "**MISSED**"
        lines.append(f"| {t['target']} | {t['config']} | {nums} | {res} |")
    lines += ["", "## SDPA backends on the model's layer-0 call", ""]
    for n, probe in sorted(report["sdpa_backends"].items(), key=lambda kv: int(kv[0])):
        if "backends" not in probe:
            lines.append(f"- N={n}: {probe.get('note') or 'probe failed: ' + str(probe.get('error'))}")
            continue
        parts = [
            f"{k} {_fmt(b['ms'], '.3f')} ms"
            if b["ms"] is not None
            else f"{k} unavailable ({b['error'][:120]})"
            for k, b in probe["backends"].items()
        ]
        lines.append(f"- N={n} ({probe['call']}): " + "; ".join(parts) + f". Fastest: {probe['fastest']}.")
    lines += ["", "## Plans", ""]
    for r in report["rows"]:
        if r["kind"] != "attnopt" or r["compiled"] or "families" not in r:
            continue
        lines.append(
            f"- **N={r['n']} {r['budget']}**: {r['families']}; feasible {r['feasible']}; planned in "
            f"{_fmt(r.get('plan_s'), '.1f')}s ({', '.join(f'{k} {s:.1f}s' for k, s in r['plan_timings'].items())})"
        )
        for s in r.get("steps", []) + ([r["explanation"]] if r.get("explanation") else []):
            lines.append(f"  - {s}")
    problems = [r for r in report["rows"] if r["status"] not in ("ok",)]
    notes = [
        r for r in report["rows"] if r.get("recompiled_while_profiling") or r.get("logits_finite") is False
    ]
    if problems or notes:
        lines += ["", "## Not measured, failures and warnings", ""]
        for r in problems:
            lines.append(f"- N={r['n']} {r['config']}: {_status(r)}: {r['reason']}")
        for r in notes:
            if r.get("recompiled_while_profiling"):
                lines.append(
                    f"- N={r['n']} {r['config']}: dynamo compiled a graph during the profiled forward"
                )
            if r.get("logits_finite") is False:
                lines.append(f"- N={r['n']} {r['config']}: non-finite logits")
    lines += ["", "Accuracy is not measured here (random weights); see `benchmarks/planning.py`."]
    return "\n".join(lines) + "\n"


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become None, tensors lists, unknown objects strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def _versions() -> dict[str, str]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    out = {
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "attnopt": attnopt.__version__, "python": platform.python_version(),
    }  # fmt: skip
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from attnopt.cost_model.device import local_device_name

    return local_device_name("cpu")


def write(out: pathlib.Path, report: dict[str, Any], t0: float) -> None:
    """Recompute the derived numbers and targets, then (re)write ``end_to_end.json`` and ``.md``."""
    derive(report["rows"])
    report["targets"] = targets(report["rows"], report["target_n"])
    report["wall_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    data = _clean(report)
    (out / "end_to_end.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / "end_to_end.md").write_text(to_markdown(data))


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny Llama, N=256, fp32, 1 rep, 1 thread, no torch.compile"
    )
    p.add_argument(
        "--out", type=pathlib.Path, default=None, help="results folder (default benchmarks/results/)"
    )
    p.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="N values, in run order (32768 8192 65536)"
    )
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda, or cpu with --smoke"
    )
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 (float32 with --smoke)")  # fmt: skip
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up forwards incl. the first call (default 2)"
    )
    p.add_argument("--reps", type=int, default=None, help="timed forwards (default 5; 1 with --smoke)")
    p.add_argument("--probe-reps", type=int, default=None, help="timed runs per SDPA backend (default 10)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    p.add_argument(
        "--compile", action="store_true", help="run the torch.compile configurations even with --smoke"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which configurations not yet started are skipped (default 450; 0: none)",
    )
    p.add_argument("--target-n", type=int, default=None, help="N the targets are checked at (default 32768)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)"
    )
    args = p.parse_args(argv)
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "end_to_end.py: no CUDA device; run with --smoke (CPU) or --device cpu.\n")
    args.dtype = getattr(torch, args.dtype or ("float32" if smoke else "bfloat16"))
    args.lengths = args.lengths or ([256] if smoke else [32768, 8192, 65536])
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if smoke else 2))
    args.reps = max(1, args.reps if args.reps is not None else (1 if smoke else 5))
    args.probe_reps = args.probe_reps or (1 if smoke else 10)
    args.no_compile = (args.no_compile or smoke) and not args.compile
    args.time_limit = 450.0 if args.time_limit is None else args.time_limit
    args.target_n = args.target_n or (args.lengths[0] if smoke else 32768)
    # The smoke run checks structure, not speed: one thread keeps it fast on a shared CI machine, where
    # two-thread CPU ops slow down by 10x or more whenever a core is taken away.
    args.threads = args.threads or (1 if smoke else torch.get_num_threads())
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write ``end_to_end.json`` / ``.md`` and return the report."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("attnopt").setLevel(logging.WARNING)
    out = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="end_to_end_")) if args.smoke else RESULTS)
    spec = SMOKE_MODEL if args.smoke else FULL_MODEL
    t0 = time.perf_counter()
    base = build_base_model(spec, max(args.lengths), args.dtype, args.device)
    ctx = Context(args, base, spec)
    ctx.t0 = t0
    budgets = [b for b in BUDGETS if b in args.budgets]
    first = ["default", "sdpa_forced", *(f"attnopt_{b}" for b in budgets)]
    second = ["inductor", *(f"attnopt_{b}_compile" for b in budgets)]
    report: dict[str, Any] = {
        "benchmark": "end_to_end",
        "mode": "smoke" if args.smoke else "full",
        "device": _device_name(args.device),
        "device_type": args.device,
        "versions": _versions(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": {
            "name": "tiny random Llama" if args.smoke else "random Llama ~1B",
            "params": sum(p.numel() for p in base.parameters()),
            "dtype": str(args.dtype).replace("torch.", ""),
            "layers": spec["num_hidden_layers"],
            "hidden": spec["hidden_size"],
            "heads": spec["num_attention_heads"],
            "kv_heads": spec["num_key_value_heads"],
            "head_dim": spec["head_dim"],
            "intermediate": spec["intermediate_size"],
            "vocab": spec["vocab_size"],
            "seed": 0,
        },  # fmt: skip
        "lengths": list(args.lengths),
        "budgets": budgets,
        "configs": [*first[:2], second[0], *first[2:], *second[1:]],
        "target_n": args.target_n,
        "timing": {
            "warmup": args.warmup,
            "reps": args.reps,
            "probe_reps": args.probe_reps,
            "time_limit_s": args.time_limit,
            "compile": not args.no_compile,
            "threads": args.threads,
        },
        "attention_rule": (
            "sum over outermost attention ops (names starting with "
            + ", ".join(ATTENTION_OP_PREFIXES)
            + ") of device_time_total on CUDA / cpu_time_total on CPU; ops nested in another attention op "
            "(same thread ancestry or another thread's time range) or in a dynamo tracing region are not counted"
        ),
        "sdpa_backends": ctx.sdpa,
        "rows": [],
        "targets": [],
        "wall_s": 0.0,
    }
    print(json.dumps({k: report[k] for k in ("device", "versions", "date", "lengths")}), flush=True)
    for phase in (first, second):
        for n in args.lengths:
            for name in phase:
                log.info("N=%d %s ...", n, name)
                row = run_config(ctx, n, name)
                report["rows"].append(row)
                keys = ("n", "config", "status", "reason", "attention_ms", "forward_ms", "families", "plan_s")
                print(json.dumps(_clean({k: row.get(k) for k in keys})), flush=True)
                write(out, report, t0)
    write(out, report, t0)
    print((out / "end_to_end.md").read_text())
    print(f"wrote {out / 'end_to_end.json'} and {out / 'end_to_end.md'}")
    return _clean(report)


if __name__ == "__main__":
    main()
