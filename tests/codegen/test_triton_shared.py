"""Shared-score Triton kernel against ``attention_reference`` with representative scores.

For head ``h`` in cluster ``c`` the reference is exact attention with the query and key of the
representative head ``reps[c]`` and the value of ``h``'s own kv head. Interpreter on CPU;
fresh random inputs, NaN-poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.codegen.triton._common import rel_error
from attnopt.codegen.triton.shared import member_table, shared_attention
from attnopt.replacements.exact import attention_reference, repeat_kv_heads

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-3 if DEV == "cuda" else 1e-5, torch.float16: 5e-3}


def _reference(q, k, v, coh, reps, **kw):
    hq = q.shape[1]
    src = reps[coh].to(q.device)
    kk, vv = repeat_kv_heads(k.float(), hq), repeat_kv_heads(v.float(), hq)
    return attention_reference(q.float()[:, src], kk[:, src], vv, **kw)


def _run(q, k, v, coh, reps, **kw):
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), device=q.device, dtype=v.dtype)
    shared_attention(q, k, v, coh, reps, out=out, block_m=32, block_n=32, **kw)
    assert not out.isnan().any(), "kernel left output elements unwritten (NaN poison survived)"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "hkv,nq,nk,d,dv,causal,window,members",
    [
        (3, 50, 80, 32, 16, True, None, 4),  # GQA, Nq < Nk, all members of a cluster in one program
        (6, 64, 64, 16, 16, False, None, 2),  # the 3-head cluster needs two chunks
        (3, 40, 100, 64, 32, True, 30, 1),  # window, one member per program
    ],
)
def test_matches_reference(hkv, nq, nk, d, dv, causal, window, members, dtype):
    hq = 6
    coh = torch.tensor([0, 1, 0, 2, 1, 0])
    reps = torch.tensor([2, 4, 3])
    q = torch.randn(1, hq, nq, d, device=DEV, dtype=dtype)
    k = torch.randn(1, hkv, nk, d, device=DEV, dtype=dtype)
    v = torch.randn(1, hkv, nk, dv, device=DEV, dtype=dtype)
    out = _run(q, k, v, coh, reps, causal=causal, window=window, members=members)
    ref = _reference(q, k, v, coh, reps, causal=causal, window=window)
    assert rel_error(out.float(), ref) < TOL[dtype]


def test_singleton_clusters_are_exact_attention():
    q = torch.randn(2, 4, 72, 32, device=DEV)
    k = torch.randn(2, 2, 72, 32, device=DEV)
    v = torch.randn(2, 2, 72, 32, device=DEV)
    out = _run(q, k, v, torch.arange(4), torch.arange(4), causal=True)
    assert rel_error(out, attention_reference(q, k, v, causal=True)) < TOL[torch.float32]


def test_member_table_and_errors():
    reps, table, chunks, members = member_table(torch.tensor([1, 0, 1, 1, 1]), torch.tensor([1, 2]), 2)
    assert (
        chunks == 2
        and members == 2
        and table.tolist() == [[1, -1, -1, -1], [0, 2, 3, 4]]
        and reps.tolist() == [1, 2]
    )
    with pytest.raises(ValueError, match="cluster ids"):
        member_table(torch.tensor([0, 3]), torch.tensor([0, 1]), 2)
    assert member_table(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), None)[3] == 2
    with pytest.raises(ValueError, match="power of two"):
        member_table(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="representative"):
        member_table(torch.tensor([0, 1]), torch.tensor([0, 7]), 2)
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="one entry per query head"):
        shared_attention(q, q, q, torch.tensor([0, 0, 0]), torch.tensor([0]))


def test_op_adapter_matches_portable_kernel():
    """The CUDA adapter (run here on CPU tensors) computes what the family's portable kernel computes."""
    sh = pytest.importorskip("attnopt.replacements.shared")
    from attnopt.codegen.ops import KERNELS, AttentionCall
    from attnopt.codegen.triton.shared import shared_kernel

    cfg = sh.SharedConfig(clusters=((0, 2, 3), (1,)), representatives=(2, 1))
    q = torch.randn(1, 4, 48, 32, device=DEV)
    k = torch.randn(1, 2, 64, 32, device=DEV)
    v = torch.randn(1, 2, 64, 32, device=DEV)
    meta = {"site": "t#0", "family": "shared", "config": cfg.to_json(), "mask_static": True, "window": None}
    call = AttentionCall(q, k, v, None, sh.shared_params(cfg, 4), 32**-0.5, True, None, meta)
    out = shared_kernel(call)
    ref = _reference(q, k, v, torch.tensor([0, 1, 0, 0]), torch.tensor([2, 1]), causal=True)
    assert rel_error(out, ref) < TOL[torch.float32]
    if ("shared", "cpu") in KERNELS:
        assert rel_error(out, KERNELS[("shared", "cpu")](call)) < 1e-4
