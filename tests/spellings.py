"""A generator of attention modules written every way attnopt's matchers claim to handle, and of
near-misses that are not attention.

Shared by the property tests (``tests/patterns/test_fuzz_spellings.py``, a few hundred examples in
CI) and the larger run (``benchmarks/fuzz_spellings.py``). A :class:`Spelling` is pure data, drawn by
the hypothesis strategy :func:`spellings`; :func:`build` turns it into a module, its inputs, and what
``find_sites`` must report. Every axis the matchers claim is varied independently:

* **layout**: ``(B, H, N, D)`` through ``matmul``/``@``; ``(B, N, H, D)`` through ``einsum``;
  ``(B·H, N, D)`` through ``bmm`` or ``baddbmm`` (Bloom / DeBERTa style);
* **scale**: multiply or divide the scores, pre-scale Q or K, ``baddbmm``'s ``alpha``, none;
* **mask**: none; causal from ``tril``/``triu``/``arange`` comparisons, applied by
  ``masked_fill``/``where``/addition; a sliding window; key padding from an input mask via
  ``masked_fill``/``where``/an additive ``(1 - mask) * min`` bias; causal and padding together;
  fill values ``-inf`` and ``finfo.min``;
* **softmax**: ``Tensor.softmax``/``F.softmax``/``torch.softmax``, with or without an fp32 upcast,
  ``dim=-1`` or the positive index;
* **dropout** in eval mode (functional or ``nn.Dropout``) or none;
* **GQA** via HF's ``repeat_kv`` (expand + reshape), ``repeat_interleave`` or ``unsqueeze/expand/
  flatten``; **self or cross** attention (keys from a second input of another length).

Negatives (:data:`NEGATIVES`) are softmaxes that are not attention: scores against a weight instead
of keys, softmax over the query axis, and a second product with something that is not V.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = [
    "LAYOUTS", "MASKS", "NEGATIVES", "Built", "Spelling", "build", "build_negative", "check_found", "check_negative",
    "check_rewrite", "spellings",
]  # fmt: skip

LAYOUTS = ("bhnd_matmul", "bhnd_at", "bnhd_einsum", "bh_bmm", "bh_baddbmm")
SCALES = ("mul", "div", "pre_q", "pre_k", "alpha", "none")
#: Mask spellings; ``causal*``/``window*`` need self-attention, ``pad*`` an input mask.
MASKS = (
    "none", "causal_tril_masked_fill", "causal_triu_masked_fill", "causal_arange_where", "causal_additive",
    "window_arange_where", "pad_masked_fill", "pad_where", "pad_additive", "causal_pad_where",
)  # fmt: skip
SOFTMAXES = ("method", "functional", "torch")
GQA_FORMS = ("repeat_kv", "repeat_interleave", "expand_flatten")
DROPOUTS = ("none", "functional", "module")
NEGATIVES = ("weight_scores", "softmax_query_axis", "p_transposed_times_v", "p_times_p", "p_times_weight")
#: The site's mask kind as :class:`attnopt.patterns.site.AttentionSite` spells it.
MASK_KIND = {
    "none": "none", "causal_tril_masked_fill": "causal", "causal_triu_masked_fill": "causal",
    "causal_arange_where": "causal", "causal_additive": "causal", "window_arange_where": "sliding_window",
    "pad_masked_fill": "padding", "pad_where": "padding", "pad_additive": "padding", "causal_pad_where": "padding",
}  # fmt: skip


@dataclass(frozen=True)
class Spelling:
    """One way of writing one attention; every field is an independent axis of the generator."""

    layout: str = "bhnd_matmul"
    scale: str = "mul"
    mask: str = "none"
    fill: str = "-inf"  # or "min": finfo(dtype).min
    softmax: str = "method"
    upcast: bool = False
    positive_dim: bool = False
    dropout: str = "none"
    gqa: str = "repeat_kv"  # used when kv_heads < heads
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    dtype: str = "float32"  # the model's dtype in the rewrite check
    cross: bool = False
    batch: int = 2
    q_len: int = 6
    kv_len: int = 6
    window: int = 3

    def describe(self) -> str:
        """A one-line name for reports (the fields that differ from the defaults)."""
        base = asdict(Spelling())
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if base[k] != v) or "defaults"


@dataclass
class Built:
    """A generated module, the inputs it is called with, and what ``find_sites`` must report."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    expected: dict[str, Any]


@st.composite
def spellings(draw: st.DrawFn) -> Spelling:
    """A valid :class:`Spelling`: constraints between axes (alpha needs baddbmm, causal needs self
    attention, kv heads divide heads) are resolved here, so every draw is attention."""
    layout = draw(st.sampled_from(LAYOUTS))
    scales = [s for s in SCALES if s != "alpha" or layout == "bh_baddbmm"]
    cross = draw(st.booleans())
    masks = [m for m in MASKS if not (cross and m.startswith(("causal", "window")))]
    heads = draw(st.sampled_from((1, 2, 4, 6)))
    kv_heads = draw(st.sampled_from([g for g in (1, 2, 3, 4, 6) if heads % g == 0]))
    q_len = draw(st.integers(2, 12))
    kv_len = draw(st.integers(2, 12)) if cross else q_len
    return Spelling(
        layout=layout, scale=draw(st.sampled_from(scales)), mask=draw(st.sampled_from(masks)),
        fill=draw(st.sampled_from(("-inf", "min"))), softmax=draw(st.sampled_from(SOFTMAXES)),
        upcast=draw(st.booleans()), positive_dim=draw(st.booleans()), dropout=draw(st.sampled_from(DROPOUTS)),
        gqa=draw(st.sampled_from(GQA_FORMS)), heads=heads, kv_heads=kv_heads,
        head_dim=draw(st.sampled_from((4, 8, 16))), dtype=draw(st.sampled_from(("float32", "float32", "bfloat16"))),
        cross=cross, batch=draw(st.integers(1, 3)),
        q_len=q_len, kv_len=kv_len, window=draw(st.integers(1, max(1, q_len - 1))),
    )  # fmt: skip


class Fuzzed(nn.Module):
    """Attention spelled as a :class:`Spelling` says; projections q/k/v/o are ``nn.Linear``."""

    def __init__(self, spec: Spelling, embed: int = 16) -> None:
        super().__init__()
        self.spec = spec
        h, hkv, d = spec.heads, spec.kv_heads, spec.head_dim
        self.q, self.k, self.v = nn.Linear(embed, h * d), nn.Linear(embed, hkv * d), nn.Linear(embed, hkv * d)
        self.o = nn.Linear(h * d, embed)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        sp = self.spec
        src = x if memory is None else memory
        b, nq, nk = x.shape[0], x.shape[1], src.shape[1]
        h, hkv, d = sp.heads, sp.kv_heads, sp.head_dim
        scale = d**-0.5
        q = self.q(x).view(b, nq, h, d)
        k = self.k(src).view(b, nk, hkv, d)
        v = self.v(src).view(b, nk, hkv, d)
        if sp.scale == "pre_q":
            q = q * scale
        elif sp.scale == "pre_k":
            k = k * scale
        if sp.layout == "bnhd_einsum":
            k, v = (_repeat(t, h // hkv, sp.gqa, dim=2) for t in (k, v))
            s = torch.einsum("bqhd,bkhd->bhqk", q, k)
            s = self._post_scale(s, scale)
            p = self._probs(self._mask(s, keep, nq, nk), dims=4)
            return self.o(torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, nq, h * d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = (_repeat(t, h // hkv, sp.gqa, dim=1) for t in (k, v))
        if sp.layout.startswith("bh_"):
            qb, kb, vb = q.reshape(b * h, nq, d), k.reshape(b * h, nk, d), v.reshape(b * h, nk, d)
            if sp.layout == "bh_baddbmm":
                alpha = scale if sp.scale == "alpha" else 1.0
                s = torch.baddbmm(qb.new_zeros(b * h, nq, nk), qb, kb.transpose(1, 2), beta=0.0, alpha=alpha)
            else:
                s = torch.bmm(qb, kb.transpose(1, 2))
            s = self._post_scale(s, scale)
            if sp.mask == "none":
                p = self._probs(s, dims=3)
            else:
                p = self._probs(self._mask(s.view(b, h, nq, nk), keep, nq, nk), dims=4).view(b * h, nq, nk)
            return self.o(torch.bmm(p, vb).view(b, h, nq, d).transpose(1, 2).reshape(b, nq, h * d))
        kt = k.transpose(-2, -1)
        s = torch.matmul(q, kt) if sp.layout == "bhnd_matmul" else q @ kt
        p = self._probs(self._mask(self._post_scale(s, scale), keep, nq, nk), dims=4)
        return self.o((p @ v).transpose(1, 2).reshape(b, nq, h * d))

    def _post_scale(self, s: torch.Tensor, scale: float) -> torch.Tensor:
        if self.spec.scale == "mul":
            return s * scale
        if self.spec.scale == "div":
            return s / math.sqrt(self.spec.head_dim)
        return s

    def _mask(self, s: torch.Tensor, keep: torch.Tensor | None, nq: int, nk: int) -> torch.Tensor:
        m, dev = self.spec.mask, s.device
        fill = float("-inf") if self.spec.fill == "-inf" else torch.finfo(s.dtype).min
        if m == "none":
            return s
        i, j = torch.arange(nq, device=dev)[:, None], torch.arange(nk, device=dev)[None, :]
        if m == "causal_tril_masked_fill":
            return s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=dev).tril(), fill)
        if m == "causal_triu_masked_fill":
            return s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=dev).triu(1), fill)
        if m == "causal_arange_where":
            return torch.where(j <= i, s, fill)
        if m == "causal_additive":
            return s + torch.full((nq, nk), fill, device=dev, dtype=s.dtype).triu(1)
        if m == "window_arange_where":
            return torch.where((j <= i) & (i - j < self.spec.window), s, fill)
        pad = keep[:, None, None, :]
        if m == "pad_masked_fill":
            return s.masked_fill(~pad, fill)
        if m == "pad_where":
            return torch.where(pad, s, torch.tensor(fill, dtype=s.dtype, device=dev))
        if m == "pad_additive":
            return s + (1.0 - pad.to(s.dtype)) * torch.finfo(s.dtype).min
        if m == "causal_pad_where":
            return torch.where(pad & (j <= i), s, fill)
        raise AssertionError(m)

    def _probs(self, s: torch.Tensor, dims: int) -> torch.Tensor:
        sp = self.spec
        dim = dims - 1 if sp.positive_dim else -1
        dtype = torch.float32 if sp.upcast else None
        if sp.softmax == "method":
            p = (s.float() if sp.upcast else s).softmax(dim)
        elif sp.softmax == "functional":
            p = F.softmax(s, dim=dim, dtype=dtype)
        else:
            p = torch.softmax(s, dim, dtype=dtype)
        p = p.to(s.dtype) if sp.upcast else p
        if sp.dropout == "functional":
            p = F.dropout(p, p=0.1, training=self.training)
        elif sp.dropout == "module":
            p = self.drop(p)
        return p


def _repeat(t: torch.Tensor, groups: int, form: str, *, dim: int) -> torch.Tensor:
    """K or V repeated ``groups`` times per head along ``dim`` (the heads axis), as models write it."""
    if groups == 1:
        return t
    if form == "repeat_interleave":
        return t.repeat_interleave(groups, dim=dim)
    shape = list(t.shape)
    expanded = t.unsqueeze(dim + 1).expand(*shape[: dim + 1], groups, *shape[dim + 1 :])
    if form == "repeat_kv":  # transformers' repeat_kv: expand then reshape
        return expanded.reshape(*shape[:dim], shape[dim] * groups, *shape[dim + 1 :])
    return expanded.flatten(dim, dim + 1)


def _inputs(spec: Spelling, seed: int, embed: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.batch, spec.q_len, embed, generator=g)
    memory = torch.randn(spec.batch, spec.kv_len, embed, generator=g) if spec.cross else None
    keep = None
    if spec.mask.startswith(("pad", "causal_pad")):
        # a different padding per row; every row keeps its first key, so no query row is empty. With
        # causal, two keys at least: a mask that keeps one key looks like plain padding (and is reported so)
        shortest = 2 if spec.mask.startswith("causal") else 1
        lengths = torch.randint(shortest, spec.kv_len + 1, (spec.batch,), generator=g)
        keep = torch.arange(spec.kv_len)[None, :] < lengths[:, None]
    if memory is None and keep is None:
        return (x,)
    return (x, memory, keep)


def build(spec: Spelling, seed: int = 0) -> Built:
    """The module of ``spec`` (eval mode, seeded weights), its example inputs and the expected site."""
    torch.manual_seed(seed)
    module = Fuzzed(spec).eval()
    expected = dict(
        num_heads=spec.heads, num_kv_heads=spec.kv_heads, head_dim=spec.head_dim, cross=spec.cross,
        mask=MASK_KIND[spec.mask], causal=spec.mask.startswith(("causal", "window")),
        window=spec.window if spec.mask.startswith("window") else None,
        scale=1.0 if spec.scale == "none" else spec.head_dim**-0.5,
    )  # fmt: skip
    return Built(module, _inputs(spec, seed), expected)


def inputs(spec: Spelling, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh inputs of ``spec``'s shapes (another draw than :func:`build`'s example)."""
    return _inputs(spec, seed)


class Negative(nn.Module):
    """A softmax-then-product that is not attention (see :data:`NEGATIVES`)."""

    def __init__(self, kind: str, spec: Spelling, embed: int = 16) -> None:
        super().__init__()
        self.kind, self.spec = kind, spec
        h, d = spec.heads, spec.head_dim
        self.q, self.k, self.v = (nn.Linear(embed, h * d) for _ in range(3))
        self.o = nn.Linear(h * d, embed)
        self.slots = nn.Parameter(torch.randn(spec.q_len, d))  # a weight, not an activation
        self.mix = nn.Parameter(torch.randn(spec.q_len, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.spec.heads, self.spec.head_dim
        q, k, v = (proj(x).view(b, n, h, d).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scale = d**-0.5
        if self.kind == "weight_scores":  # scores against learned slots: a router / memory layer
            p = (q @ self.slots.t() * scale).softmax(-1)
            out = p @ v
        elif self.kind == "softmax_query_axis":
            p = (q @ k.transpose(-2, -1) * scale).softmax(dim=-2)
            out = p @ v
        else:
            p = (q @ k.transpose(-2, -1) * scale).softmax(-1)
            if self.kind == "p_transposed_times_v":
                out = p.transpose(-2, -1) @ v
            elif self.kind == "p_times_p":
                out = (p @ p)[..., :d] if n >= d else F.pad(p @ p, (0, d - n))
            else:  # p_times_weight
                out = p @ self.mix
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


def build_negative(kind: str, spec: Spelling, seed: int = 0) -> Built:
    """A :class:`Negative` of ``kind`` at ``spec``'s sizes (self-attention shapes, no mask)."""
    torch.manual_seed(seed)
    spec = replace(spec, cross=False, kv_len=spec.q_len, kv_heads=spec.heads)
    return Built(Negative(kind, spec).eval(), _inputs(replace(spec, mask="none"), seed), {})


# -- the properties, shared by the tests and the larger benchmark run -------------------------------------

#: FlashAttention's rule: attnopt's error against a float64 reference may be at most twice the
#: error of the model's own same-dtype PyTorch code, plus this absolute slack (per dtype) for
#: outputs whose reference error is at rounding level.
ATOL = {"float32": 1e-5, "bfloat16": 1e-2}


def check_found(spec: Spelling, seed: int = 0) -> str | None:
    """``None`` when ``find_sites`` reports exactly the one site ``spec`` built, else what differs."""
    import attnopt

    b = build(spec, seed)
    sites = attnopt.find_sites(b.module, *b.args)
    if len(sites) != 1:
        return f"{len(sites)} sites found, expected 1"
    s = sites[0]
    got = dict(num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, cross=s.cross,
               mask=s.mask, causal=s.causal, window=s.window, scale=s.scale)  # fmt: skip
    wrong = {k: (got[k], v) for k, v in b.expected.items() if not _same(got[k], v)}
    if wrong:
        return "found (got, expected): " + ", ".join(f"{k}={g!r}/{e!r}" for k, (g, e) in wrong.items())
    if not s.rewritable:
        return f"not rewritable: {s.reason}"
    return None


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b, rel_tol=1e-6) if isinstance(b, float) else a == b


def check_rewrite(spec: Spelling, seed: int = 0) -> str | None:
    """``None`` when the site ``spec`` built is rewritten to ``attnopt::exact`` and the rewritten
    model's output on fresh inputs meets FlashAttention's rule against a float64 copy, else what failed.

    ``optimize(model, "1x")`` plans every site exact, and a plan that leaves every site exact
    installs nothing, so its output is the original's bit for bit and tests no rewrite. The
    rewrite that matters is the one every plan's exact operator, calibration and ``torch.compile
    (backend="attnopt")`` run: the matched subgraph replaced by ``attnopt::exact``. It is applied
    here through the compile backend without Inductor, so what runs is exactly the rewritten graph.
    """
    import copy

    from attnopt.rewriter.backend import RewriteBackend, exact_everywhere

    b = build(spec, seed)
    dtype = getattr(torch, spec.dtype)
    original = copy.deepcopy(b.module).to(dtype)
    ref_model = copy.deepcopy(b.module).double()
    backend = RewriteBackend(exact_everywhere, inductor=False)
    torch._dynamo.reset()
    rewritten = torch.compile(b.module.to(dtype), backend=backend, fullgraph=True)
    fresh = inputs(spec, seed + 1)
    with torch.no_grad():
        out = rewritten(*_cast(fresh, dtype)).double()
        theirs = original(*_cast(fresh, dtype)).double()
        ref = ref_model(*_cast(fresh, torch.float64))
    n = sum(c["rewritten"] for c in backend.compiles)
    if n != 1:
        return f"{n} sites rewritten, expected 1"
    ours_err, their_err = (out - ref).abs().max().item(), (theirs - ref).abs().max().item()
    if not math.isfinite(ours_err) or ours_err > 2 * their_err + ATOL[spec.dtype]:
        return f"error {ours_err:.3g} > 2 x {their_err:.3g} (the model's own {spec.dtype} code) + {ATOL[spec.dtype]:g}"
    return None


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    """``args`` with floating tensors in ``dtype`` (masks and ``None`` as they are)."""
    return tuple(a.to(dtype) if a is not None and a.is_floating_point() else a for a in args)


def check_negative(kind: str, spec: Spelling, seed: int = 0) -> str | None:
    """``None`` when the near-miss ``kind`` is not reported as rewritable and ``optimize`` leaves its
    output bit for bit as it was, else what happened."""
    import warnings

    import attnopt

    b = build_negative(kind, spec, seed)
    rewritable = [s.name for s in attnopt.find_sites(b.module, *b.args) if s.rewritable]
    if rewritable:
        return f"reported as rewritable attention: {rewritable}"
    with torch.no_grad():
        before = b.module(*b.args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no attention found" is the expected outcome
            model = attnopt.optimize(b.module, "1x", calib=[b.args], progress=False)
        after = model(*b.args)
    if not torch.equal(before, after):
        return "output changed after optimize()"
    return None
