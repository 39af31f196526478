"""Block-sparse Triton kernel (and its sparse+quantized mode) against ``attention_reference``.

Runs under the Triton interpreter on CPU (``tests/conftest.py``); sizes are small so the file
stays well under a minute. Every check draws fresh random inputs, poisons the output with NaN
first and requires every element to be written.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.codegen.triton import source
from attnopt.codegen.triton._common import fp8_supported, rel_error
from attnopt.codegen.triton.block_sparse import (
    block_sparse_attention,
    layout_allowed,
    layout_from_block_layout,
    structural_layout,
)
from attnopt.codegen.triton.quantized import quantized_reference
from attnopt.replacements.exact import attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreter fp32 dots are exact fp32; on a GPU they are tf32. fp16 adds P rounded to fp16.
TOL = {torch.float32: 2e-3 if DEV == "cuda" else 1e-5, torch.float16: 5e-3}


def _qkv(b, hq, hkv, nq, nk, d, dtype, dv=None):
    q = torch.randn(b, hq, nq, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, nk, dv or d, device=DEV, dtype=dtype)
    return q, k, v


def _poisoned(q, v):
    return torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), device=q.device, dtype=v.dtype)


def _check(out, ref, tol):
    assert not out.isnan().any(), "kernel left output elements unwritten (NaN poison survived)"
    err = rel_error(out.float(), ref.float())
    assert err < tol, f"relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,d,causal,window,sink",
    [
        (1, 4, 2, 100, 100, 32, True, None, 0),  # GQA, ragged last block, causal with full blocks
        (1, 2, 1, 70, 150, 64, True, 40, 16),  # Nq < Nk bottom-right, window + sinks
        (2, 2, 2, 64, 80, 16, False, None, 0),  # non-causal, batch 2
    ],
)
def test_structural_layouts_match_reference(b, hq, hkv, nq, nk, d, causal, window, sink, dtype):
    q, k, v = _qkv(b, hq, hkv, nq, nk, d, dtype)
    lay = structural_layout(
        nq, nk, q_block=32, kv_block=32, causal=causal, window=window, sink=sink, device=DEV
    )
    out = _poisoned(q, v)
    block_sparse_attention(q, k, v, *lay, q_block=32, kv_block=32, causal=causal, window=window, sink=sink,
                           block_m=32, block_n=32, out=out)  # fmt: skip
    allowed = layout_allowed(*lay, q_len=nq, kv_len=nk, q_block=32, kv_block=32, causal=causal, window=window,
                             sink=sink).to(DEV)  # fmt: skip
    ref = attention_reference(q.float(), k.float(), v.float(), allowed)
    _check(out, ref, TOL[dtype])
    if window is None:  # the structural layout of a plain causal / full mask is exact attention
        _check(out, attention_reference(q.float(), k.float(), v.float(), causal=causal), TOL[dtype])


def test_random_per_head_layout_and_empty_rows():
    """A different random block selection per (batch, head), some query blocks with no block at all."""
    b, hq, hkv, nq, nk, d = 2, 2, 1, 96, 112, 32
    q, k, v = _qkv(b, hq, hkv, nq, nk, d, torch.float32)
    mq, mk = 3, 4
    sel = torch.rand(b, hq, mq, mk) < 0.5
    sel[0, 1, 2] = False  # this query block sees nothing: its rows must come out as zeros
    full = sel & (torch.rand(b, hq, mq, mk) < 0.5)
    part = sel & ~full
    order = lambda s: torch.argsort((~s).int() * mk + torch.arange(mk), dim=-1, stable=True).int()  # noqa: E731
    lay = (part.sum(-1).int(), order(part), full.sum(-1).int(), order(full))
    out = _poisoned(q, v)
    block_sparse_attention(q, k, v, *(t.to(DEV) for t in lay), q_block=32, kv_block=32, causal=True,
                           block_m=16, block_n=32, out=out)  # fmt: skip
    allowed = layout_allowed(*lay, q_len=nq, kv_len=nk, q_block=32, kv_block=32, causal=True).to(DEV)
    _check(out, attention_reference(q, k, v, allowed), TOL[torch.float32])
    assert out[0, 1, 64:].abs().max() == 0


def test_per_head_windows_from_block_layout():
    bl = pytest.importorskip("attnopt.replacements.block_layout")
    hq, nq, nk, d = 4, 90, 90, 32
    windows = [16, 40, 90, 8]
    q, k, v = _qkv(1, hq, 2, nq, nk, d, torch.float16)
    layout = bl.BlockLayout.from_sink_window(nq, nk, 4, windows, q_block=32, kv_block=32, device=DEV)
    out = _poisoned(q, v)
    block_sparse_attention(
        q, k, v, **layout_from_block_layout(layout), causal=True, window=windows, sink=4, out=out
    )
    ref = attention_reference(q.float(), k.float(), v.float(), layout.to_dense().to(DEV))
    _check(out, ref, TOL[torch.float16])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_sparse_quantized_matches_quantized_reference(fmt):
    if fmt == "fp8" and not fp8_supported(torch.device(DEV)):
        pytest.skip("FP8 dots need CUDA sm89+ or the interpreter")
    nq, nk, d = 80, 128, 64
    q, k, v = _qkv(1, 2, 1, nq, nk, d, torch.float16)
    k = k + 3.0 * torch.randn(
        1, 1, 1, d, device=DEV, dtype=k.dtype
    )  # channel offsets: what smoothing removes
    lay = structural_layout(nq, nk, q_block=32, kv_block=32, causal=True, window=48, sink=8, device=DEV)
    allowed = layout_allowed(*lay, q_len=nq, kv_len=nk, q_block=32, kv_block=32, causal=True, window=48,
                             sink=8).to(DEV)  # fmt: skip
    out = _poisoned(q, v)
    block_sparse_attention(q, k, v, *lay, q_block=32, kv_block=32, causal=True, window=48, sink=8,
                           qk_format=fmt, block_m=32, block_n=32, out=out)  # fmt: skip
    ref_q = quantized_reference(q, k, v, qk_format=fmt, block_m=32, block_n=32, attn_mask=allowed)
    _check(out, ref_q, 5e-3)
    exact = attention_reference(q.float(), k.float(), v.float(), allowed)
    _check(out, exact, 3e-2 if fmt == "int8" else 1.5e-1)


def test_rejects_bad_inputs():
    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float32)
    lay = structural_layout(64, 64, q_block=32, kv_block=32, causal=True, device=DEV)
    with pytest.raises(ValueError, match="tile"):
        block_sparse_attention(q, k, v, *lay, q_block=32, kv_block=32, block_n=64)
    with pytest.raises(ValueError, match="kv_indices"):
        block_sparse_attention(q, k, v, lay[0], lay[1][0], q_block=32, kv_block=32)
    with pytest.raises(ValueError, match="divisible"):
        block_sparse_attention(q[:, :1], k.expand(1, 2, 64, 32), v.expand(1, 2, 64, 32), *lay, q_block=32,
                               kv_block=32)  # fmt: skip
    with pytest.raises(ValueError, match="qk_format"):
        block_sparse_attention(q, k, v, *lay, q_block=32, kv_block=32, qk_format="int4")


def test_launched_sources_are_written(tmp_path):
    q, k, v = _qkv(1, 1, 1, 32, 32, 16, torch.float32)
    lay = structural_layout(32, 32, q_block=32, kv_block=32, causal=True, device=DEV)
    source.clear_launches()
    block_sparse_attention(q, k, v, *lay, q_block=32, kv_block=32, causal=True)
    paths = source.write_sources(tmp_path)
    assert len(paths) == 1 and (tmp_path / "index.json").exists()
    text = paths[0].read_text()
    assert "def _block_sparse_fwd" in text and "def attn_tile" in text and "SPARSE_KV_BLOCK = 32" in text
    compile(text, str(paths[0]), "exec")  # the saved file is valid Python


def _call(q, k, v, config, params=(), causal=True, window=None):
    from attnopt.codegen.ops import AttentionCall

    cfg = {
        "site": "t#0",
        "family": config.family,
        "config": config.to_json(),
        "mask_static": True,
        "window": window,
    }
    return AttentionCall(q, k, v, None, list(params), q.shape[-1] ** -0.5, causal, window, cfg)


def test_op_adapter_matches_portable_kernel():
    """The CUDA adapter (run here on CPU tensors) computes what the family's portable kernel computes."""
    bs = pytest.importorskip("attnopt.replacements.block_sparse")
    from attnopt.codegen.ops import KERNELS
    from attnopt.codegen.triton.block_sparse import block_sparse_kernel

    cfg = bs.BlockSparseConfig(mode="static", sink=4, windows=(24, 40), min_window=8, block=32)
    q, k, v = _qkv(1, 2, 1, 96, 96, 32, torch.float32)
    call = _call(q, k, v, cfg)
    out = block_sparse_kernel(call)
    assert not out.isnan().any()
    layout = bs.layout_for(q, k, cfg, scale=call.scale, causal=True)
    ref = attention_reference(q, k, v, layout.to_dense(), scale=call.scale)
    _check(out, ref, TOL[torch.float32])
    if ("block_sparse", "cpu") in KERNELS:
        _check(out, KERNELS[("block_sparse", "cpu")](call), 1e-4)
