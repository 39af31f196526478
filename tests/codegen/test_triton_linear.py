"""Chunked (hybrid) linear attention Triton kernel against plain PyTorch references.

``_reference`` below states the definition row by row, independently of the module's own
``linear_attention_reference`` (which the test checks too): weights ``φ(q_i)·φ(k_j)`` for linear
keys, ``exp(s_ij − m_i)`` for the exact window keys ``p_i − W < j <= p_i`` (``m_i`` their max),
one normaliser ``Σ w + eps``. Interpreter on CPU; fresh random inputs, NaN-poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.codegen.triton._common import rel_error
from attnopt.codegen.triton.linear import linear_attention, linear_attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-3 if DEV == "cuda" else 1e-5, torch.float16: 5e-3}
EPS = 1e-6


def _reference(pq, pk, v, *, causal, window=None, q=None, k=None, scale=None):
    """Row-by-row float64 statement of the definition (module docstring of attnopt.codegen.triton.linear)."""
    b, hq, nq, _ = pq.shape
    hkv, nk = pk.shape[1], pk.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, nq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        pkh, vh = pk[:, h // g].double(), v[:, h // g].double()
        for i in range(nq):
            p = i + nk - nq
            j = torch.arange(nk)
            w = pq[:, h, i].double() @ pkh.transpose(-1, -2)  # (B, Nk) linear weights
            if window:
                lin = j <= p - window
                near = (j <= p) & (j > p - window)
                s = (q[:, h, i].double() @ k[:, h // g].double().transpose(-1, -2)) * (
                    scale or q.shape[-1] ** -0.5
                )
                s = s.masked_fill(~near, float("-inf"))
                m = s.amax(-1, keepdim=True)
                w = torch.where(near, torch.exp(s - m), torch.where(lin, w, 0.0))
            elif causal:
                w = torch.where(j <= p, w, 0.0)
            tot = w.sum(-1, keepdim=True) + EPS
            out[:, h, i] = torch.where(tot == 0, 0.0, (w @ vh) / tot)
    return out


def _inputs(hq, hkv, nq, nk, f, d, dv, dtype):
    pq = torch.rand(1, hq, nq, f, device=DEV, dtype=dtype)
    pk = torch.rand(1, hkv, nk, f, device=DEV, dtype=dtype)
    v = torch.randn(1, hkv, nk, dv, device=DEV, dtype=dtype)
    q = torch.randn(1, hq, nq, d, device=DEV, dtype=dtype)
    k = torch.randn(1, hkv, nk, d, device=DEV, dtype=dtype)
    return pq, pk, v, q, k


def _run(pq, pk, v, **kw):
    out = torch.full((*pq.shape[:-1], v.shape[-1]), float("nan"), device=v.device, dtype=v.dtype)
    linear_attention(pq, pk, v, out=out, eps=EPS, **kw)
    assert not out.isnan().any(), "kernel left output elements unwritten (NaN poison survived)"
    return out


@pytest.mark.parametrize(
    "hq,hkv,nq,nk,f,dv,causal,chunk,dtype",
    [
        (2, 1, 80, 80, 32, 16, True, 32, torch.float32),  # GQA, N not a multiple of the chunk
        (2, 1, 80, 80, 32, 16, True, 32, torch.float16),
        (
            2,
            2,
            50,
            100,
            24,
            32,
            True,
            16,
            torch.float32,
        ),  # Nq < Nk: prefix keys only feed the state; F padded
        (2, 1, 90, 40, 16, 16, True, 16, torch.float16),  # Nq > Nk: the first rows see no key and must be 0
        (2, 2, 64, 70, 32, 64, False, 32, torch.float32),  # non-causal
        (2, 2, 64, 70, 32, 64, False, 32, torch.float16),
    ],
)
def test_linear_matches_reference(hq, hkv, nq, nk, f, dv, causal, chunk, dtype):
    pq, pk, v, _, _ = _inputs(hq, hkv, nq, nk, f, 16, dv, dtype)
    out = _run(pq, pk, v, causal=causal, chunk=chunk)
    ref = _reference(pq, pk, v, causal=causal)
    assert rel_error(out, ref) < TOL[dtype]
    assert rel_error(linear_attention_reference(pq, pk, v, causal=causal, eps=EPS), ref) < 1e-5
    if nq > nk and causal:
        assert out[:, :, : nq - nk].abs().max() == 0


@pytest.mark.parametrize(
    "hq,hkv,nq,nk,d,window,chunk,block_dv,dtype",
    [
        (2, 1, 77, 77, 32, 20, 16, None, torch.float32),  # window longer than a chunk, not a multiple
        (2, 1, 77, 77, 32, 20, 16, None, torch.float16),
        (2, 2, 40, 100, 64, 48, 32, None, torch.float16),  # Nq < Nk
        (
            2,
            1,
            64,
            64,
            16,
            100,
            32,
            16,
            torch.float32,
        ),  # window longer than the sequence; Dv split over programs
    ],
)
def test_hybrid_window_matches_reference(hq, hkv, nq, nk, d, window, chunk, block_dv, dtype):
    pq, pk, v, q, k = _inputs(hq, hkv, nq, nk, 16, d, 32, dtype)
    out = _run(pq, pk, v, causal=True, window=window, q=q, k=k, chunk=chunk, block_dv=block_dv)
    ref = _reference(pq, pk, v, causal=True, window=window, q=q, k=k)
    assert rel_error(out, ref) < TOL[dtype]
    mod_ref = linear_attention_reference(pq, pk, v, causal=True, window=window, q=q, k=k, eps=EPS)
    assert rel_error(mod_ref, ref) < 1e-5


def test_rejects_bad_inputs():
    pq, pk, v, q, k = _inputs(2, 1, 32, 32, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="window"):
        linear_attention(pq, pk, v, window=8)
    with pytest.raises(ValueError, match="window"):
        linear_attention(pq, pk, v, causal=False, window=8, q=q, k=k)
    with pytest.raises(ValueError, match="chunk"):
        linear_attention(pq, pk, v, chunk=24)
    with pytest.raises(ValueError, match="phi_k"):
        linear_attention(pq, pk.half(), v)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        linear_attention(pq, pk[:, :, :16], v)


def test_reference_and_eps_are_the_linear_familys():
    """One definition: the module's reference is the family's, and the kernel's default eps is LINEAR_EPS."""
    import inspect

    lin = pytest.importorskip("attnopt.replacements.linear")
    assert linear_attention_reference is lin.linear_feature_reference
    assert inspect.signature(linear_attention).parameters["eps"].default == lin.LINEAR_EPS
    pq, pk, v, _, _ = _inputs(2, 1, 48, 32, 16, 16, 16, torch.float32)  # 16 rows see no key: 0, not NaN
    out = torch.full((1, 2, 48, 16), float("nan"), device=DEV)
    linear_attention(pq, pk, v, causal=True, chunk=16, out=out)
    assert out[:, :, :16].abs().max() == 0
    assert rel_error(out, linear_attention_reference(pq, pk, v, causal=True)) < TOL[torch.float32]


@pytest.mark.parametrize("window", [0, 24])
def test_op_adapter_matches_family_reference(window):
    """The CUDA adapter (run here on CPU tensors) computes the linear family's own reference."""
    lin = pytest.importorskip("attnopt.replacements.linear")
    from attnopt.codegen.ops import AttentionCall
    from attnopt.codegen.triton.linear import linear_kernel

    cfg = lin.LinearConfig(feature_dim=8, window=window, chunk=16)
    params = lin.init_feature_maps(2, 1, 32, 8, seed=1)
    q, k, v = (torch.randn(1, h, 70, 32, device=DEV) for h in (2, 1, 1))
    meta = {"site": "t#0", "family": "linear", "config": cfg.to_json(), "mask_static": True, "window": None}
    call = AttentionCall(q, k, v, None, params, 32**-0.5, True, None, meta)
    out = linear_kernel(call)
    ref = lin.linear_reference(q, k, v, params, cfg, scale=32**-0.5, causal=True)
    assert rel_error(out, ref) < TOL[torch.float32]
