"""Every family on masked rows and odd shapes, on the CPU kernels and the Triton kernels.

Issue 14, item 2: left-padded batches (rows whose keys are all masked), padding-only sequences,
length 1, lengths that are no multiple of any block size, head dims 32..256, fp32/fp16/bf16, and
batches whose rows are padded differently. For each (family config, path, shape case) the output

* has no NaN or Inf (exact attention, :func:`attention_reference`, is finite on every case: the
  library defines a row with no allowed key as zero, not NaN),
* is zero on every row that sees no key (a boolean or ``-inf`` mask, or the causal structure,
  hides them all) -- what ``attention_reference`` documents,
* meets the family's bound: its own reference (the one definition its kernels are tested
  against), computed in float64 on the same inputs and mask, within the dtype's rounding; and
  where the family documents a distance to exact attention (quantized: SageAttention's band;
  configs that keep every key: exact), that too.

"CPU" runs the registered operator (``torch.ops.attnopt.<family>``), so mask classification and
dispatch are exercised as a rewritten model would; "triton" calls the family's CUDA kernel
adapter on CPU tensors under the Triton interpreter (``tests/conftest.py``), fp32/fp16 only (the
interpreter's bf16 arithmetic is not faithful). Mask tensors make those adapters hand the call
to the portable kernel, which is part of what is checked. Shapes stay small (N <= 130, B <= 3,
H <= 4) except the head dims, which are the point of their cases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from attnopt.codegen.ops import KERNELS, AttentionCall, op_for
from attnopt.patterns.masks import combined_allowed
from attnopt.replacements.base import Candidate, FamilyConfig, get_family
from attnopt.replacements.block_sparse import BlockSparseConfig
from attnopt.replacements.exact import ExactConfig, attention_reference
from attnopt.replacements.head_pruned import HeadPrunedConfig
from attnopt.replacements.linear import LinearConfig, init_feature_maps
from attnopt.replacements.quantized import QuantizedConfig
from attnopt.replacements.shared import SharedConfig, shared_params

# -- shape cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One shape: sizes, causality and the model's mask.

    ``pads`` gives each batch row's left padding (keys ``j < pads[b]`` hidden; ``pads[b] == nk``
    hides the whole sequence). ``mask`` is how the model spells it: ``"bool"`` (B, 1, 1, Nk)
    key padding, ``"neginf"`` the same as an additive ``-inf`` mask, or ``"hf"`` Hugging Face's
    (B, 1, Nq, Nk) additive mask at ``finfo(dtype).min`` with causality folded in (the call then
    says ``is_causal=False``).
    """

    name: str
    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    causal: bool
    pads: tuple[int, ...] | None = None
    mask: str | None = None


CASES = [
    Case("n1", 1, 2, 2, 1, 1, 64, True),
    Case("n1_noncausal", 2, 2, 1, 1, 1, 32, False),
    Case("decode_left_pad", 2, 4, 2, 1, 65, 64, True, pads=(0, 30), mask="bool"),
    Case("n7", 2, 2, 1, 7, 7, 32, False),
    Case("n65_causal", 1, 2, 2, 65, 65, 64, True),
    Case("n127", 1, 2, 1, 127, 127, 32, False),
    Case("n130_causal_gqa", 2, 4, 2, 130, 130, 32, True),
    Case("d80", 1, 2, 2, 70, 70, 80, True),
    Case("d96", 1, 2, 1, 70, 70, 96, False),
    Case("d128", 1, 2, 2, 70, 70, 128, True),
    Case("d256", 1, 2, 2, 40, 40, 256, True),
    Case("cross_causal_empty_rows", 1, 2, 2, 40, 20, 32, True),  # bottom-right: rows 0..19 see nothing
    Case("left_pad_causal", 3, 2, 2, 70, 70, 64, True, pads=(0, 9, 50), mask="bool"),
    Case("left_pad_neginf", 3, 2, 1, 65, 65, 32, False, pads=(3, 0, 64), mask="neginf"),
    Case("pad_only_causal", 2, 2, 2, 33, 33, 32, True, pads=(0, 33), mask="bool"),
    Case("pad_only_neginf", 2, 2, 2, 33, 33, 32, False, pads=(5, 33), mask="neginf"),
    Case("hf_left_pad", 3, 2, 2, 70, 70, 64, True, pads=(0, 7, 69), mask="hf"),
]
CASE_IDS = [c.name for c in CASES]
#: The cases the Triton kernels themselves serve (no mask tensor), plus one masked case that checks
#: the hand-off to the portable kernel.
TRITON_CASES = [c for c in CASES if c.mask is None] + [c for c in CASES if c.name == "left_pad_causal"]


def _inputs(case: Case, dtype: torch.dtype):
    """``(q, k, v, mask, call_causal, mask64, hides)``: inputs, the mask as passed to the op and as
    the float64 reference gets it, and whether masked keys are hidden outright (bool / ``-inf``)."""
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    q = torch.randn(case.b, case.hq, case.nq, case.d, generator=gen).to(dtype)
    k = torch.randn(case.b, case.hkv, case.nk, case.d, generator=gen).to(dtype)
    v = torch.randn(case.b, case.hkv, case.nk, case.d, generator=gen).to(dtype)
    if case.mask is None:
        return q, k, v, None, case.causal, None, True
    keys = torch.arange(case.nk)[None, :] >= torch.tensor(case.pads)[:, None]  # (B, Nk)
    if case.mask == "bool":
        mask = keys[:, None, None, :]
        return q, k, v, mask, case.causal, mask, True
    if case.mask == "neginf":
        mask = torch.zeros(case.b, 1, 1, case.nk, dtype=dtype).masked_fill(~keys[:, None, None, :], float("-inf"))
        return q, k, v, mask, case.causal, mask.double(), True
    allowed = keys[:, None, None, :].expand(case.b, 1, case.nq, case.nk)
    structural = combined_allowed(case.nq, case.nk, causal=case.causal, window=None, device=q.device)
    if structural is not None:
        allowed = allowed & structural
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return q, k, v, mask, False, mask.double(), False


def _empty_rows(case: Case, mask64: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """``(B, 1|H, Nq)`` True where a row has no allowed key (structure and mask together)."""
    allowed = torch.ones(case.b, 1, case.nq, case.nk, dtype=torch.bool)
    structural = combined_allowed(case.nq, case.nk, causal=causal, window=None, device=allowed.device)
    if structural is not None:
        allowed = allowed & structural
    if mask64 is not None:
        # The cases' additive masks are 0 (attend) or -inf / finfo(dtype).min (hide).
        allowed = allowed & (mask64 if mask64.dtype == torch.bool else mask64 == 0)
    return ~allowed.any(-1)


# -- family configs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One config of one family, with its params for a case and its documented bounds.

    ``exact_bound``: the relative L2 distance to exact attention the family documents for this
    config (0 for configs that keep every key: they *are* exact attention), or None when the
    distance depends on the data (a sparse selection, fitted maps, pruned heads).
    """

    name: str
    family: str
    config: FamilyConfig
    params: Callable[[Case], list[torch.Tensor]] = lambda case: []
    causal_only: bool = False
    exact_bound: float | None = None
    triton: bool = True


def _pairs(case: Case) -> SharedConfig:
    """Heads shared in pairs ``(0, 1), (2, 3)``, the second head of each pair representing it."""
    clusters = tuple(tuple(range(h, min(h + 2, case.hq))) for h in range(0, case.hq, 2))
    return SharedConfig(clusters=clusters, representatives=tuple(c[-1] for c in clusters))


def _singletons(case: Case) -> SharedConfig:
    return SharedConfig(clusters=tuple((h,) for h in range(case.hq)), representatives=tuple(range(case.hq)))


def _linear_params(case: Case) -> list[torch.Tensor]:
    return init_feature_maps(case.hq, case.hkv, case.d, 16, seed=1)


SAGE1 = QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=128, k_block=64)
FINE = QuantizedConfig(qk_format="int8", pv_format="fp16", q_block=32, k_block=16)
FP8 = QuantizedConfig(qk_format="fp8_e4m3", pv_format="fp8_e4m3", q_block=128, k_block=64)

VARIANTS = [
    Variant("exact", "exact", ExactConfig(), exact_bound=0.0, triton=False),
    Variant("bs_static", "block_sparse", BlockSparseConfig(mode="static", sink=4, windows=(16,), min_window=16,
                                                           calib_len=128), causal_only=True),  # fmt: skip
    Variant("bs_dynamic", "block_sparse", BlockSparseConfig(mode="dynamic", density=0.5, block=32)),
    Variant("bs_dynamic_all", "block_sparse", BlockSparseConfig(mode="dynamic", density=1.0, block=32),
            exact_bound=0.0),  # fmt: skip
    Variant("bs_mass", "block_sparse", BlockSparseConfig(mode="dynamic", mass=0.9, block=16), triton=False),
    Variant("bs_skip", "block_sparse", BlockSparseConfig(mode="skip", block=32, skip_log_threshold=-4.0,
                                                         calib_len=64)),  # fmt: skip
    Variant("q_sage1", "quantized", SAGE1, exact_bound=0.03),
    Variant("q_fine", "quantized", FINE, exact_bound=0.03, triton=False),
    Variant("q_fp8", "quantized", FP8, exact_bound=0.1, triton=False),
    Variant("linear", "linear", LinearConfig(feature_dim=16, chunk=16), params=_linear_params),
    Variant("linear_hybrid", "linear", LinearConfig(feature_dim=16, window=16, chunk=16), params=_linear_params,
            causal_only=True),  # fmt: skip
    Variant("shared_pairs", "shared", SharedConfig(), params=lambda c: shared_params(_pairs(c), c.hq)),
    Variant("shared_singletons", "shared", SharedConfig(), params=lambda c: shared_params(_singletons(c), c.hq),
            exact_bound=0.0),  # fmt: skip
    Variant("head_pruned", "head_pruned", HeadPrunedConfig(keep=(1,)), params=lambda c: [torch.tensor([1])],
            triton=False),  # fmt: skip
]
VARIANT_IDS = [v.name for v in VARIANTS]


def _config(variant: Variant, case: Case) -> FamilyConfig:
    if variant.family == "shared":
        return _singletons(case) if variant.name == "shared_singletons" else _pairs(case)
    return variant.config


def _candidate(variant: Variant, case: Case) -> Candidate:
    return Candidate(site="sweep", family=variant.family, config=_config(variant, case), params=variant.params(case))


# -- tolerances ----------------------------------------------------------------------------

#: Relative L2 error a kernel may add to its family's float64 reference: the rounding of the
#: inputs' dtype (fp16 and bf16 outputs, and P rounded to them inside SDPA's low-precision paths).
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
#: What a family's own arithmetic adds on top in fp32 (quantized kernels run fp32 math on
#: integer-valued tensors; fp8 P·V may flip a rounding on an fp32 tie), per family and path.
FAMILY_TOL = {"quantized": 5e-5, "quantized_fp8": 2e-4}
#: The Triton kernels in fp32 under the interpreter (exact fp32 dots, different summation order).
TRITON_FP32_TOL = 1e-5
#: The quantized Triton kernel rounds P̃ to fp16 relative to its running row max, the reference
#: relative to the final one: the same rounding at other points, ~2^-11 per element, independent.
TRITON_FP16_P_TOL = 5e-4


def _tol(variant: Variant, dtype: torch.dtype) -> float:
    fam = "quantized_fp8" if variant.config == FP8 else variant.family
    return max(DTYPE_TOL[dtype], FAMILY_TOL.get(fam, 0.0))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    den = r.norm().item()
    return (o - r).norm().item() / (den if den > 0 else 1.0)


# -- the two paths -------------------------------------------------------------------------


def _op_config(variant: Variant, case: Case) -> str:
    # min_q_len=1: run the family's kernel on one-query calls too (a plan's decode="family"),
    # not the exact attention the operator falls back to by default.
    return json.dumps(
        {"site": "sweep", "family": variant.family, "config": _config(variant, case).to_json(), "min_q_len": 1}
    )


def _run_cpu(variant: Variant, case: Case, q, k, v, mask, causal) -> torch.Tensor:
    params = variant.params(case)
    if variant.family == "head_pruned":  # a weight rewrite: its kernel is reached through a redirect
        call = AttentionCall(q, k, v, mask, params, case.d**-0.5, causal or case.nq == 1, None,
                             json.loads(_op_config(variant, case)))  # fmt: skip
        return KERNELS[("head_pruned", "any")](call)
    return op_for(variant.family)(q, k, v, mask, params, case.d**-0.5, causal, _op_config(variant, case))


def _triton_kernels() -> dict[str, Callable[[AttentionCall], torch.Tensor]]:
    pytest.importorskip("triton")
    import attnopt.codegen.triton.block_sparse as tbs
    import attnopt.codegen.triton.linear as tlin
    import attnopt.codegen.triton.quantized as tq
    import attnopt.codegen.triton.shared as tsh

    return {
        "block_sparse": tbs.block_sparse_kernel,
        "quantized": tq.quantized_kernel,
        "linear": tlin.linear_kernel,
        "shared": tsh.shared_kernel,
    }


def _run_triton(variant: Variant, case: Case, q, k, v, mask, causal) -> torch.Tensor:
    call = AttentionCall(q, k, v, mask, variant.params(case), case.d**-0.5, causal or case.nq == 1, None,
                         json.loads(_op_config(variant, case)))  # fmt: skip
    out = _triton_kernels()[variant.family](call)
    # The operator casts a kernel's output to v's dtype (kernels may return fp32 for half inputs,
    # or P·V's format): the adapter is called directly here, so do what ``_run`` does.
    return out.to(v.dtype)


# -- the checks ----------------------------------------------------------------------------


def _check(variant: Variant, case: Case, dtype: torch.dtype, run, tol: float) -> None:
    q, k, v, mask, causal, mask64, hides = _inputs(case, dtype)
    causal_ref = causal or case.nq == 1
    out = run(variant, case, q, k, v, mask, causal)
    where = f"{variant.name} on {case.name} ({dtype})"
    assert out.shape == (case.b, case.hq, case.nq, case.d), where
    assert out.dtype == v.dtype, where
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{where}: {int(bad.sum())} NaN/Inf outputs, e.g. at {bad.nonzero()[0].tolist()}"
    q64, k64, v64 = q.double(), k.double(), v.double()
    exact = attention_reference(q64, k64, v64, mask64, scale=case.d**-0.5, causal=causal_ref)
    assert torch.isfinite(exact).all()
    empty = _empty_rows(case, mask64, causal_ref).expand(case.b, case.hq, case.nq)
    if hides and empty.any():
        assert out[empty].abs().max().item() == 0, f"{where}: rows with no key are not 0"
    fam = get_family(variant.family)
    ref = fam.reference(q64, k64, v64, _candidate(variant, case), scale=case.d**-0.5, causal=causal_ref,
                        attn_mask=mask64)  # fmt: skip
    if not hides:
        # Rows whose every key carries finfo(dtype).min are padding the model discards; what they
        # hold depends on how low-precision arithmetic absorbs ``min + s`` (SDPA averages the
        # scores' softmax, a fp16 tile rounds them away), so only finiteness is asked of them.
        keep = (~empty)[..., None].to(out.dtype)
        out, ref, exact = out * keep, ref * keep.to(ref.dtype), exact * keep.to(exact.dtype)
    err = _rel(out, ref)
    assert err <= tol, f"{where}: relative error {err:.3g} to the family's reference > {tol:g}"
    if variant.exact_bound is not None:
        bound = max(variant.exact_bound, tol)
        err = _rel(out, exact)
        assert err <= bound, f"{where}: relative error {err:.3g} to exact attention > {bound:g}"


def _applies(variant: Variant, case: Case) -> bool:
    return not variant.causal_only or (case.causal and case.mask != "hf")


CPU_PARAMS = [
    pytest.param(v, c, dt, id=f"{v.name}-{c.name}-{str(dt)[6:]}")
    for v in VARIANTS
    for c in CASES
    if _applies(v, c)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
]
TRITON_PARAMS = [
    pytest.param(v, c, dt, id=f"{v.name}-{c.name}-{str(dt)[6:]}")
    for v in VARIANTS
    if v.triton
    for c in TRITON_CASES
    if _applies(v, c)
    for dt in (torch.float32, torch.float16)
]


@pytest.mark.parametrize("variant,case,dtype", CPU_PARAMS)
def test_cpu_kernel(variant: Variant, case: Case, dtype: torch.dtype) -> None:
    _check(variant, case, dtype, _run_cpu, _tol(variant, dtype))


@pytest.mark.parametrize("variant,case,dtype", TRITON_PARAMS)
def test_triton_kernel(variant: Variant, case: Case, dtype: torch.dtype) -> None:
    tol = max(_tol(variant, dtype), TRITON_FP32_TOL)
    if variant.family == "quantized" and variant.config.pv_format == "fp16":
        tol = max(tol, TRITON_FP16_P_TOL)
    _check(variant, case, dtype, _run_triton, tol)
