"""Time attnopt's Triton kernels next to the peers, on the peers' shapes, in one run.

Usage::

    python benchmarks/kernels.py                 # GPU: B=1, H=32, D=128, N in {8192, 32768}, bf16+fp16
    python benchmarks/kernels.py --smoke         # CPU, Triton interpreter, tiny shapes (keeps this file alive in CI)

Rows (same inputs, same machine, same run, method of ``../shared/bench/anchor_bench.py``:
``triton.testing.do_bench`` median, warm-up first; error = ‖out − ref‖/‖ref‖ against float32 SDPA
with the same mask, only where that reference fits in memory):

* dense: SDPA flash / cuDNN, attnopt flash (``qk_format="native"``), attnopt INT8 and FP8 (sm89+),
  SageAttention 1.0.6 when importable;
* block-sparse (causal, sink 128 + window 1024 / 4096): attnopt block-sparse, attnopt sparse+INT8, and
  FlexAttention on the *identical* layout (``BlockMask.from_kv_blocks`` of our tensors);
* shared scores (8 clusters of 4 heads), chunked linear attention (F=128) and its hybrid
  (window 512), fla ``chunk_linear_attn`` when importable (a different function; time only).

FLOPs: ``4·B·H·Nq·Nk·D`` for dense attention, halved when causal (``TF(dense-eq)``); ``TF(useful)``
counts only the computed blocks' share. Writes ``kernels-<device>.json`` and ``.md`` (device, versions,
date, table) into ``benchmarks/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

if "--smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from attnopt.codegen.triton.block_sparse import (  # noqa: E402
    block_sparse_attention,
    layout_allowed,
    structural_layout,
)
from attnopt.codegen.triton.linear import linear_attention, linear_attention_reference  # noqa: E402
from attnopt.codegen.triton.quantized import quantized_attention  # noqa: E402
from attnopt.codegen.triton.shared import shared_attention  # noqa: E402

ROWS: list[dict] = []


def bench(fn, smoke: bool) -> float:
    """Median milliseconds (events via do_bench on GPU; one wall-clock run under the interpreter)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None:
        return None
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def record(name, n, dtype, mask, ms, err=None, density=1.0, causal=True, shape=None, note="") -> None:
    b, h, d = shape
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    row = dict(
        name=name, n=n, dtype=str(dtype).replace("torch.", ""), mask=mask, ms=round(ms, 4),
        tflops_dense_equiv=round(flops / (ms * 1e-3) / 1e12, 1),
        tflops_useful=round(flops * density / (ms * 1e-3) / 1e12, 1),
        rel_err=None if err is None else round(err, 5), density=round(density, 4), note=note,
    )  # fmt: skip
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def attempt(label: str, fn) -> None:
    """Run one benchmark row; a peer that is missing or fails is reported, never fatal."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (peers fail in many ways; the run must go on)
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def sdpa_ref(q, k, v, mask=None, causal=False):
    """float32 SDPA reference (GQA expanded)."""
    g = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(g, 1) for x in (k, v))
    return F.scaled_dot_product_attention(
        q.float(), kf, vf, attn_mask=mask, is_causal=causal and mask is None
    )


def dense_rows(q, k, v, n, dtype, shape, smoke, with_ref):
    ref = sdpa_ref(q, k, v, causal=True) if with_ref else None
    if not smoke:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(be=be, name=name):
                with sdpa_kernel(be):
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                    out = fn()
                    record(name, n, dtype, "causal", bench(fn, smoke), rel_err(out, ref), shape=shape)

            attempt(name, run)
    formats = ["native", "int8"]
    if smoke or (q.device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)):
        formats.append("fp8")
    for fmt in formats:

        def run(fmt=fmt):
            bm, bn = (128, 64) if not smoke else (32, 32)

            def fn():
                return quantized_attention(q, k, v, causal=True, qk_format=fmt, block_m=bm, block_n=bn)

            out = fn()
            record(
                f"attnopt_dense_{fmt}", n, dtype, "causal", bench(fn, smoke), rel_err(out, ref), shape=shape
            )

        attempt(f"attnopt_dense_{fmt}", run)
    if not smoke and dtype == torch.float16:

        def run_sage():
            from sageattention import sageattn

            fn = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=True)  # noqa: E731
            out = fn()
            record("sageattn", n, dtype, "causal", bench(fn, smoke), rel_err(out, ref), shape=shape)

        attempt("sageattn", run_sage)


def sparse_rows(q, k, v, n, dtype, shape, smoke, with_ref, sink, window):
    blk = 128 if not smoke else 32
    lay = structural_layout(
        n, n, q_block=blk, kv_block=blk, causal=True, window=window, sink=sink, device=q.device
    )
    mq = lay[0].shape[-1]
    density = float((lay[0].sum() + lay[2].sum()) / (mq * (mq + 1) / 2))  # share of the causal blocks
    mask_name = f"sink{sink}+window{window}"
    ref = None
    if with_ref:
        allowed = layout_allowed(*(t.cpu() for t in lay), q_len=n, kv_len=n, q_block=blk, kv_block=blk,
                                 causal=True, window=window, sink=sink).to(q.device)  # fmt: skip
        ref = sdpa_ref(q, k, v, mask=allowed)
    for fmt in ("native", "int8"):

        def run(fmt=fmt):
            tiles = dict(block_m=128 if fmt == "native" else 64, block_n=64) if not smoke else {}
            fn = lambda: block_sparse_attention(q, k, v, *lay, q_block=blk, kv_block=blk, causal=True,  # noqa: E731
                                                window=window, sink=sink, qk_format=fmt, **tiles)  # fmt: skip
            out = fn()
            record(f"attnopt_block_sparse_{fmt}", n, dtype, mask_name, bench(fn, smoke), rel_err(out, ref),
                   density=density, shape=shape)  # fmt: skip

        attempt(f"attnopt_block_sparse_{fmt}", run)
    if not smoke:

        def run_flex():
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            def mask_mod(b, h, qi, ki):
                return (qi >= ki) & ((qi - ki < window) | (ki < sink))

            bm = BlockMask.from_kv_blocks(lay[0], lay[1], lay[2], lay[3], BLOCK_SIZE=(blk, blk), mask_mod=mask_mod,
                                          seq_lengths=(n, n))  # fmt: skip
            flex = torch.compile(flex_attention, dynamic=False)
            fn = lambda: flex(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])  # noqa: E731
            out = fn()
            record("flex_same_blockmask", n, dtype, mask_name, bench(fn, smoke), rel_err(out, ref),
                   density=density, shape=shape)  # fmt: skip

        attempt("flex", run_flex)


def shared_rows(q, k, v, n, dtype, shape, smoke, with_ref):
    h = q.shape[1]
    size = 4 if h % 4 == 0 else 1
    coh = torch.arange(h, device=q.device) // size
    reps = torch.arange(0, h, size, device=q.device)
    ref = None
    if with_ref:
        src = reps[coh]
        ref = sdpa_ref(q[:, src], k.repeat_interleave(h // k.shape[1], 1)[:, src],
                       v.repeat_interleave(h // k.shape[1], 1), causal=True)  # fmt: skip

    def run():
        tiles = dict(block_m=64, block_n=64) if not smoke else dict(block_m=32, block_n=32)
        fn = lambda: shared_attention(q, k, v, coh, reps, causal=True, members=size, **tiles)  # noqa: E731
        out = fn()
        record(f"attnopt_shared_{h // size}x{size}", n, dtype, "causal", bench(fn, smoke), rel_err(out, ref),
               shape=shape, note="P from one head per cluster")  # fmt: skip

    attempt("shared", run)


def linear_rows(q, k, v, n, dtype, shape, smoke, with_ref):
    feat = q.shape[-1]
    pq = torch.softmax(q.float(), -1).to(dtype)  # positive features stand in for fitted maps
    pk = torch.softmax(k.float(), -1).to(dtype)
    chunk = 64 if not smoke else 32
    for window in (None, 512 if not smoke else 16):

        def run(window=window):
            fn = lambda: linear_attention(pq, pk, v, causal=True, window=window, q=q, k=k, chunk=chunk,  # noqa: E731
                                          block_dv=64 if not smoke else None)  # fmt: skip
            out = fn()
            ref = None
            if with_ref and n <= 4096:
                ref = linear_attention_reference(pq, pk, v, causal=True, window=window, q=q, k=k)
            name = "attnopt_linear" if window is None else f"attnopt_linear_hybrid_w{window}"
            record(name, n, dtype, "causal", bench(fn, smoke), rel_err(out, ref), shape=shape,
                   note=f"F={feat}; err vs its own float32 definition")  # fmt: skip

        attempt(f"linear w={window}", run)
    if not smoke:

        def run_fla():
            from fla.ops.linear_attn import chunk_linear_attn

            qt, kt, vt = (x.transpose(1, 2).contiguous() * 0.1 for x in (q, k, v))
            fn = lambda: chunk_linear_attn(qt, kt, vt, normalize=False)  # noqa: E731
            fn()
            record(
                "fla_chunk_linear_attn",
                n,
                dtype,
                "causal",
                bench(fn, smoke),
                shape=shape,
                note="other function",
            )

        attempt("fla", run_fla)


def ceilings() -> dict:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=50, rep=300, return_mode="median")
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms_c = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return {"matmul_bf16_tflops": round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1),
            "copy_gbps_rw": round(2 * x.numel() * 2 / (ms_c * 1e-3) / 1e9, 1)}  # fmt: skip


def write(out_dir: pathlib.Path, device: str, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if meta["smoke"] else device.replace(" ", "_").replace("/", "_")
    (out_dir / f"kernels-{tag}.json").write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    lines = [f"# attnopt kernels: {device}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; B={meta['B']}, H={meta['H']}, "
             f"D={meta['D']}; ceilings {meta.get('ceilings')}", "",
             "| kernel | N | dtype | mask | ms | TF(dense-eq) | TF(useful) | rel err | note |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in ROWS:
        lines.append(f"| {r['name']} | {r['n']} | {r['dtype']} | {r['mask']} | {r['ms']} | {r['tflops_dense_equiv']} "
                     f"| {r['tflops_useful']} | {r['rel_err'] if r['rel_err'] is not None else ''} | {r['note']} |")  # fmt: skip
    (out_dir / f"kernels-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--ns", type=int, nargs="*", default=None, help="sequence lengths (default 8192 32768)")
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float16"])
    ap.add_argument("--ref-max-n", type=int, default=8192, help="largest N with a float32 reference")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    smoke = args.smoke
    dev = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        sys.exit("No CUDA device: run with --smoke for the CPU interpreter check.")
    b, h, d = (1, 4, 32) if smoke else (1, 32, 128)
    ns = args.ns or ([96] if smoke else [8192, 32768])
    dtypes = [getattr(torch, t) for t in (["float16"] if smoke else args.dtypes)]
    device = "cpu (triton interpreter)" if smoke else torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, smoke=smoke, B=b, H=h, D=d,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip
    print(json.dumps(meta), flush=True)
    torch.manual_seed(0)
    for n in ns:
        for dtype in dtypes:
            q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
            with_ref = n <= args.ref_max_n
            shape = (b, h, d)
            dense_rows(q, k, v, n, dtype, shape, smoke, with_ref)
            for sink, window in ((128, 1024), (128, 4096)) if not smoke else ((8, 24),):
                sparse_rows(q, k, v, n, dtype, shape, smoke, with_ref, sink, window)
            shared_rows(q, k, v, n, dtype, shape, smoke, with_ref)
            linear_rows(q, k, v, n, dtype, shape, smoke, with_ref)
            del q, k, v
            if not smoke:
                torch.cuda.empty_cache()
    if not smoke:
        attempt("ceilings", lambda: meta.__setitem__("ceilings", ceilings()))
    write(pathlib.Path(args.out), device, meta)
    bad = [
        r
        for r in ROWS
        if r["rel_err"] is not None and not (r["rel_err"] < (0.2 if "fp8" in r["name"] else 0.05))
    ]
    if bad:
        sys.exit(f"rel err too high or NaN in: {[r['name'] for r in bad]}")


if __name__ == "__main__":
    main()
