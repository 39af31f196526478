"""The zoo end to end: the right sites are found, and an exact rewrite changes no output.

Three layers, each able to fail on its own:

* ``test_zoo_matches_model`` checks the zoo's expectations against what the live model
  computes (an eager probe independent of attnopt), so a wrong expectation is caught here and
  not blamed on the matchers;
* ``test_find_sites`` checks :func:`attnopt.find_sites` against the expectations, property by
  property, and negatives against 0 sites;
* ``test_optimize_exact`` rewrites every site to ``attnopt::exact`` (``budget="1x"``) and
  compares with an untouched deep copy on a fresh input (and, for causal LMs, at another
  sequence length).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.zoo import SEQ, ZOO, ZooModel, by_name, flatten_outputs, version_skip

#: Site properties compared between attnopt and the zoo.
PROPERTIES = (
    "module_path",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "causal",
    "cross",
    "mask",
    "window",
    "rewritable",
)

POSITIVE = [z for z in ZOO if z.group != "negative"]
NEGATIVE = [z for z in ZOO if z.group == "negative"]
#: Families that scale q_proj's output before SDPA (the probe sees the remaining scale, 1.0).
PRESCALED_Q = ("whisper", "opt")
#: Causal LMs checked at a second sequence length after optimisation.
VARLEN = ("llama-eager", "nanogpt")


def _ids(entries: list[ZooModel]) -> list[Any]:
    params = []
    for z in entries:
        why = version_skip(z)
        params.append(pytest.param(z, id=z.name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


def _api() -> Any:
    attnopt = pytest.importorskip("attnopt")
    if not hasattr(attnopt, "find_sites") or not hasattr(attnopt, "optimize"):
        pytest.skip("attnopt.find_sites / attnopt.optimize not available yet")
    return attnopt


def site_mismatches(entry: ZooModel, sites: list[Any]) -> list[str]:
    """Human-readable differences between found sites and the zoo's expectations (empty: match)."""
    problems = []
    if len(sites) != len(entry.expected):
        problems.append(
            f"expected {len(entry.expected)} sites {[e['module_path'] for e in entry.expected]}, "
            f"but found {len(sites)} {[s.module_path for s in sites]}"
        )
    for i, (s, e) in enumerate(zip(sites, entry.expected)):
        for prop in PROPERTIES:
            got = getattr(s, prop)
            if got != e[prop]:
                problems.append(f"site {i} ({e['module_path']}): {prop} expected {e[prop]!r}, got {got!r}")
        if not math.isclose(s.scale, e["scale"], rel_tol=1e-5):
            problems.append(
                f"site {i} ({e['module_path']}): scale expected {e['scale']:.6g}, got {s.scale:.6g}"
            )
    return problems


# --------------------------------------------------------------------------- an independent probe


class _SiteProbe(TorchFunctionMode):
    """Records every SDPA call and every softmax over a 4-D ``(B, H, Nq, Nk)`` score tensor.

    Independent of attnopt: it watches the eager run, so it sees what the model really computes
    and where (the innermost module on the forward stack).
    """

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.records: list[dict[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.records.append(self._sdpa(*args, **kwargs))
        elif func is F.multi_head_attention_forward:
            self.records.append(self._mha(*args, **kwargs))
        elif func in _SOFTMAXES and args and args[0].dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3):
                self.records.append(self._softmax(args[0]))
        return func(*args, **kwargs)

    def _where(self) -> str:
        return self.stack[-1] if self.stack else ""

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # type: ignore[no-untyped-def]
        from attnopt.patterns.masks import additive_to_allowed, classify_allowed

        if attn_mask is not None:
            allowed = additive_to_allowed(attn_mask)
            mask = "bias" if allowed is None else classify_allowed(allowed)[0]
        else:
            mask = "causal" if is_causal else "none"
        return {
            "module_path": self._where(),
            "op": "sdpa",
            "num_heads": q.shape[1],
            "kv_heads_seen": k.shape[1],
            "head_dim": q.shape[-1],
            "q_len": q.shape[-2],
            "kv_len": k.shape[-2],
            "mask": mask,
            "scale": scale if scale is not None else q.shape[-1] ** -0.5,
        }

    def _mha(self, query, key, value, embed_dim, num_heads, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Called with (L, B, E) tensors; MHA has already undone batch_first.
        from attnopt.patterns.masks import additive_to_allowed, classify_allowed

        attn_mask = kwargs.get("attn_mask")
        if attn_mask is not None:
            allowed = additive_to_allowed(attn_mask)
            mask = "bias" if allowed is None else classify_allowed(allowed)[0]
        else:
            mask = "causal" if kwargs.get("is_causal") else "none"
        return {
            "module_path": self._where(),
            "op": "multi_head_attention_forward",
            "num_heads": num_heads,
            "head_dim": query.shape[-1] // num_heads,
            "q_len": query.shape[0],
            "kv_len": key.shape[0],
            "mask": mask,
        }

    def _softmax(self, scores: torch.Tensor) -> dict[str, Any]:
        from attnopt.patterns.masks import classify_allowed

        return {
            "module_path": self._where(),
            "op": "softmax",
            "num_heads": scores.shape[1],
            "q_len": scores.shape[-2],
            "kv_len": scores.shape[-1],
            "mask": classify_allowed(scores.detach() > -1.0e3)[0],
        }


_SOFTMAXES = (torch.softmax, F.softmax, torch.Tensor.softmax)


def probe_sites(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``model(*args, **kwargs)`` once and record the attention it computes, in order.

    Each record has ``module_path`` (innermost module on the forward stack), ``op``
    (``"sdpa"`` or ``"softmax"``), ``num_heads``, ``q_len``, ``kv_len`` and ``mask`` (the kind
    of the allowed pattern; for softmax records judged from ``-inf``/very negative scores,
    so a bias reads as ``"none"``). Grad stays enabled so ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` take their ordinary Python path, not the fused fast path.
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def push(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(mod), "<foreign>"))

    def pop(mod: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(push), register_module_forward_hook(pop)]
    probe = _SiteProbe(stack)
    try:
        with torch.enable_grad(), probe:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return probe.records


# --------------------------------------------------------------------------- the zoo itself


@pytest.mark.parametrize("entry", _ids(POSITIVE + NEGATIVE))
def test_zoo_matches_model(entry: ZooModel) -> None:
    """Expectations agree with what the model computes: module, heads, head dim, cross, mask."""
    model, args, kwargs = entry.build()
    records = probe_sites(model, args, kwargs)
    if entry.group == "negative":
        assert records == [], f"{entry.name}: the probe saw attention in a negative: {records}"
        return
    assert [r["module_path"] for r in records] == [e["module_path"] for e in entry.expected]
    for r, e in zip(records, entry.expected):
        where = f"{entry.name} {e['module_path']}"
        assert r["num_heads"] == e["num_heads"], where
        assert r.get("head_dim", e["head_dim"]) == e["head_dim"], where
        assert (r["q_len"] != r["kv_len"]) == e["cross"], where
        # A softmax record cannot see a bias (it reads the pattern of masked scores); SDPA can.
        if e["mask"] != "bias" or r["op"] == "sdpa":
            assert r["mask"] == e["mask"], f"{where}: probe saw mask {r['mask']!r}"
        # Whisper and OPT multiply q_proj's output by 1/sqrt(d) and call SDPA with scale=1.0: the
        # probe sees 1.0, the zoo (scale relative to the projection's output) 1/sqrt(d).
        prescaled = entry.name.startswith(PRESCALED_Q)
        if r["op"] == "sdpa" and e["mask"] != "bias" and not prescaled:
            assert math.isclose(r["scale"], e["scale"], rel_tol=1e-5), where


#: Families of ``tests/zoo_broad.py`` in both implementations, and those transformers runs eager only.
BROAD_BOTH = (
    "gpt-neox", "phi", "phi3", "gptj", "codegen", "opt", "electra", "stablelm", "starcoder2", "gemma",
    "gpt-bigcode", "falcon", "falcon-alibi", "qwen3-padded", "bart", "albert",
)  # fmt: skip
BROAD_EAGER_ONLY = ("bloom", "deberta-v2", "gpt-neo", "mpt", "gemma2")


def test_zoo_is_complete() -> None:
    """Every family named in the brief is present, names are unique, HF entries come in pairs."""
    names = [z.name for z in ZOO]
    assert len(names) == len(set(names))
    for arch in (
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "bert",
        "distilbert",
        "roberta",
        "vit",
        "t5",
        "whisper",
        "clip",
        *BROAD_BOTH,
    ):
        assert f"{arch}-eager" in names and f"{arch}-sdpa" in names, arch
    for arch in BROAD_EAGER_ONLY:
        assert f"{arch}-eager" in names, arch
    assert "gqa-repeat-kv-sdpa" in names
    assert len(NEGATIVE) == 3
    assert all(not z.expected for z in NEGATIVE)


# --------------------------------------------------------------------------- find_sites


@pytest.mark.parametrize("entry", _ids(POSITIVE + NEGATIVE))
def test_find_sites(entry: ZooModel) -> None:
    attnopt = _api()
    model, args, kwargs = entry.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = attnopt.find_sites(model, *args, **kwargs)
    problems = site_mismatches(entry, sites)
    assert not problems, f"{entry.name}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- optimize


def _outputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(model(*args, **kwargs))


def _assert_same(entry: ZooModel, got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), f"{entry.name} {what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (
            f"{entry.name} {what}: output {i} shape {tuple(g.shape)} vs {tuple(w.shape)}"
        )
        err = (g.float() - w.float()).abs().max().item() if g.numel() else 0.0
        assert torch.allclose(g.float(), w.float(), atol=1e-5, rtol=1e-5), (
            f"{entry.name} {what}: output {i} differs by {err:.3g}"
        )


def _rewritten_count(model: torch.nn.Module) -> int | None:
    """Sites the installed rewrite backends replaced over all their compiles (None if unknown).

    Compiles accumulate per input shape, so after one call at one shape this is the number of
    sites rewritten for that shape (plus any earlier shape's).
    """
    try:
        from attnopt.rewriter.install import installed_backends
    except ImportError:
        return None
    backends = installed_backends(model).values()
    return sum(c.get("rewritten", 0) for b in backends for c in getattr(b, "compiles", []))


def _optimize_and_compare(entry: ZooModel, seed: int = 1) -> None:
    """``optimize(model, "1x")`` returns the model untouched; the graph rewrite planning runs on
    (every site on attnopt's exact operator) computes what the model computes."""
    attnopt = _api()
    from attnopt.pipeline import run_plan

    model, args, kwargs = entry.build()
    original = copy.deepcopy(model)
    cls = type(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attnopt.optimize(model, budget="1x", calib=[(args, kwargs)])
    assert out is model and type(out) is cls, f"{entry.name}: optimize returned another object or class"
    assert "forward" not in model.__dict__, f"{entry.name}: an all-exact plan replaced the forward"
    fresh_args, fresh_kwargs = entry.inputs(seed=seed)
    _assert_same(
        entry,
        _outputs(model, fresh_args, fresh_kwargs),
        _outputs(original, fresh_args, fresh_kwargs),
        "fresh",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_plan(model, "1x", [(args, kwargs)], progress=False)  # leaves the exact operators installed
    _assert_same(
        entry,
        _outputs(model, fresh_args, fresh_kwargs),
        _outputs(original, fresh_args, fresh_kwargs),
        "rewritten, fresh",
    )
    rewritten = _rewritten_count(model)
    if rewritten is not None:
        assert rewritten >= entry.num_rewritable, (
            f"{entry.name}: {rewritten} site(s) rewritten to attnopt ops, expected {entry.num_rewritable}"
        )
    if entry.name in VARLEN:
        long_args, long_kwargs = entry.inputs(seed=seed + 1, seq_len=SEQ + 4)
        _assert_same(
            entry,
            _outputs(model, long_args, long_kwargs),
            _outputs(original, long_args, long_kwargs),
            "seq+4",
        )


@pytest.mark.parametrize("entry", _ids(POSITIVE))
def test_optimize_exact(entry: ZooModel) -> None:
    """``budget="1x"``: same object and class, same outputs on a fresh input."""
    _optimize_and_compare(entry)


def test_optimize_models_sharing_site_names() -> None:
    """Two models whose sites have the same names (``model.layers.0.self_attn#0``) optimised in one
    process: what is cached for the first (a causal mask) must not leak into the second (a window)."""
    _optimize_and_compare(by_name("qwen2-eager"))
    _optimize_and_compare(by_name("mistral-eager"))


@pytest.mark.parametrize("entry", _ids(NEGATIVE))
def test_optimize_negative_unchanged(entry: ZooModel, caplog: pytest.LogCaptureFixture) -> None:
    """No sites: the same model comes back untouched, and the user is told."""
    attnopt = _api()
    model, args, kwargs = entry.build()
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        out = attnopt.optimize(model, budget="1x", calib=[(args, kwargs)])
    told = [str(w.message) for w in caught] + [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
    assert any("0" in m or "no attention" in m.lower() for m in told), f"{entry.name}: no warning, got {told}"
    assert out is model and type(out) is type(original)
    assert model.forward.__func__ is type(original).forward, f"{entry.name}: forward was replaced"
    fresh_args, fresh_kwargs = entry.inputs(seed=1)
    _assert_same(
        entry,
        _outputs(model, fresh_args, fresh_kwargs),
        _outputs(original, fresh_args, fresh_kwargs),
        "fresh",
    )
