"""The ``attnopt::*`` custom operators that rewritten graphs call.

One operator per variant family, all with the same schema, so an exported graph or an MLIR
module names the variant each site runs::

    attnopt::<family>(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor[] params,
                      float scale, bool is_causal, str config) -> Tensor

* ``q``: ``(B, Hq, Nq, D)``, ``k``: ``(B, Hkv, Nk, D)``, ``v``: ``(B, Hkv, Nk, Dv)`` (GQA when
  ``Hkv < Hq``); the output is ``(B, Hq, Nq, Dv)`` in ``v``'s dtype.
* ``attn_mask``: the mask the model computed, if any (bool: True = attend, or additive float).
* ``params``: the site's fitted tensors (feature maps, block layouts, ...), in the order the
  family's config names them.
* ``is_causal``: bottom-right aligned causal constraint.
* ``config``: JSON with the site name, the family's frozen config and mask facts
  (``mask_static``, ``window``); it is a string so the op stays serialisable and exportable.

Kernels are looked up per (family, device type) in :data:`KERNELS`; families register theirs
with :func:`register_kernel`. The fake implementation gives shapes to ``torch.compile`` and
``torch.export`` without running anything.

This module is the operator interface and nothing else: the schema, kernel registration and
dispatch, with one hook (:class:`DispatchHook`) through which calibration observes calls and
the planner redirects them. The state those need is theirs (calibration's accumulators,
the planner's override table); the only state here is a weak index of the fitted tensors a
compiled graph keeps outside itself (:func:`bank_params`), which dies with the graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from attnopt.codegen.memo import BoundedCache
from attnopt.patterns.masks import additive_to_allowed, classify_allowed, combined_allowed, merge_allowed
from attnopt.replacements.base import FAMILY_NAMES

__all__ = [
    "FAMILY_OPS",
    "KERNELS",
    "AttentionCall",
    "register_kernel",
    "op_for",
    "exact_attention",
    "parse_config",
    "DispatchHook",
    "dispatch_hook",
    "overrides",
    "set_observer",
    "bank_params",
    "BankedParams",
]

#: Families with an operator of their own. ``head_pruned`` is a weight rewrite that runs the
#: ``exact`` operator with fewer heads, so it has none (its kernel, registered like any other,
#: emulates the pruned model on the full heads, for trying a plan before weights change).
FAMILY_OPS = ("exact", "block_sparse", "quantized", "linear", "shared")

_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor[] params, float scale, "
    "bool is_causal, str config) -> Tensor"
)


class AttentionCall:
    """The resolved arguments of one operator call, handed to a kernel.

    ``attn_mask`` is already reduced: a static mask recognised as none/causal/window at this
    shape is dropped and expressed through ``causal``/``window`` instead.
    """

    __slots__ = ("q", "k", "v", "attn_mask", "params", "scale", "causal", "window", "config")

    def __init__(self, q, k, v, attn_mask, params, scale, causal, window, config):
        self.q: torch.Tensor = q
        self.k: torch.Tensor = k
        self.v: torch.Tensor = v
        self.attn_mask: torch.Tensor | None = attn_mask
        self.params: list[torch.Tensor] = params
        self.scale: float = scale
        self.causal: bool = causal
        self.window: int | None = window
        self.config: dict[str, Any] = config

    def family_config(self, config_type: type[_C]) -> _C:
        """The family's frozen config this call runs (``config["config"]`` decoded as ``config_type``).

        Decoded once per distinct config: the operator receives the same JSON every call, and a
        kernel would otherwise rebuild a dataclass per call on the hot path.
        """
        raw = self.config["config"]
        key = (config_type.__qualname__, json.dumps(raw, sort_keys=True))
        cfg = _FAMILY_CONFIGS.get(key)
        if cfg is None:
            cfg = config_type.from_json(raw)
            _FAMILY_CONFIGS[key] = cfg
        return cfg


_C = TypeVar("_C")
_FAMILY_CONFIGS: BoundedCache[tuple[str, str], Any] = BoundedCache("ops.family_configs", 4096)

Kernel = Callable[[AttentionCall], torch.Tensor]


class DispatchHook:
    """The one way into a running operator: sees each call before its kernel and may redirect it.

    Calibration subclasses it to record samples, the planner to run a plan's variant at a site
    of a model that runs exact operators. Install one with :func:`dispatch_hook`.
    """

    def wants_structure(self, site: str) -> bool:
        """Whether calls at ``site`` need their mask's structure resolved (causal, window).

        Exact attention passes the model's mask straight to SDPA; a hook that records samples
        or runs a variant needs the structure, which costs one pass over a non-static mask.
        """
        return True

    def __call__(self, site: str, family: str, call: AttentionCall) -> str:
        """Called before the kernel runs; returns the family whose kernel runs ``call``.

        May change ``call.params`` and ``call.config`` to match the family it returns.
        """
        return family


#: The hook of the running thread (and asyncio task): a context variable, not a module global, so
#: a model planned in one thread (calibration's observer, the planner's overrides) never sees or
#: redirects the calls of a model serving in another, even when their sites have the same names.
_HOOK: contextvars.ContextVar[DispatchHook | None] = contextvars.ContextVar(
    "attnopt_dispatch_hook", default=None
)


@contextlib.contextmanager
def dispatch_hook(hook: DispatchHook | None) -> Iterator[DispatchHook | None]:
    """Within the block every operator call of this thread goes through ``hook`` (None: none); nests."""
    token = _HOOK.set(hook)
    try:
        yield hook
    finally:
        _HOOK.reset(token)


class _Observer(DispatchHook):
    """A plain ``observer(site, call)`` function as a hook (see :func:`set_observer`)."""

    def __init__(self, observer: Callable[[str, AttentionCall], None]) -> None:
        self.observer = observer

    def __call__(self, site: str, family: str, call: AttentionCall) -> str:
        self.observer(site, call)
        return family


def set_observer(observer: Callable[[str, AttentionCall], None] | DispatchHook | None) -> Any:
    """Make ``observer(site, call)`` (or a hook, or None) the operators' hook; returns the previous one.

    A function form of :func:`dispatch_hook` for callers that restore by hand
    (``previous = set_observer(f); ...; set_observer(previous)``); calibration uses its own hook.
    """
    previous = _HOOK.get()
    _HOOK.set(observer if observer is None or isinstance(observer, DispatchHook) else _Observer(observer))
    return previous.observer if isinstance(previous, _Observer) else previous


class _Redirect(DispatchHook):
    def __init__(self, table: dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]]) -> None:
        self.table = table

    def wants_structure(self, site: str) -> bool:
        return site in self.table

    def __call__(self, site: str, family: str, call: AttentionCall) -> str:
        redirect = self.table.get(site)
        if redirect is None:
            return family
        family, inner, params = redirect
        call.params = list(params)
        call.config = {**call.config, "family": family, "config": inner}
        return family


class overrides:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, run each ``site`` of ``table`` as ``(family, config, params)`` instead.

    The table is the caller's (the planner's, see :mod:`attnopt.rewriter.overrides`); this is
    only the hook that applies it. Nests: an inner block replaces the outer and restores it.
    """

    def __init__(self, table: dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]]) -> None:
        self.table = table

    def __enter__(self) -> overrides:
        self._ctx = dispatch_hook(_Redirect(dict(self.table)))
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


#: (family, device type) -> kernel. ``"exact"`` on every device is registered below.
KERNELS: dict[tuple[str, str], Kernel] = {}


def register_kernel(family: str, device_type: str) -> Callable[[Kernel], Kernel]:
    """Decorator: make ``fn(call) -> Tensor`` the kernel of ``family`` on ``device_type``."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"Expected a family in {FAMILY_NAMES}, but got {family!r}.")

    def deco(fn: Kernel) -> Kernel:
        KERNELS[(family, device_type)] = fn
        return fn

    return deco


_PARSED_CONFIGS: BoundedCache[str, dict[str, Any]] = BoundedCache("ops.parsed_configs", 4096)


def parse_config(config: str) -> dict[str, Any]:
    """The operator's JSON config as a dict (cached: the same string comes every call; do not mutate it)."""
    parsed = _PARSED_CONFIGS.get(config)
    if parsed is None:
        parsed = _PARSED_CONFIGS[config] = json.loads(config) if config else {}
    return parsed


# Static masks depend only on shapes, so their kind at a shape never changes: check once. Keyed by
# the rewritten site's ``rewrite_id``; the rewriter drops a graph's entries when the graph is freed
# (:func:`forget_rewrites`), and the bound covers what a long-lived graph accumulates.
_STATIC_MASK_KINDS: BoundedCache[tuple[object, tuple[int, ...], str], tuple[str, int | None]] = BoundedCache(
    "ops.static_mask_kinds", 8192
)


def forget_rewrites(rewrite_ids: frozenset[int]) -> None:
    """Drop what the operators cached for these rewritten sites (their graph was freed)."""
    _STATIC_MASK_KINDS.discard_where(lambda key: key[0] in rewrite_ids)


def _resolve_mask(
    attn_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    is_causal: bool,
    config: dict[str, Any],
    variant: bool = False,
) -> tuple[torch.Tensor | None, bool, int | None]:
    """Reduce the model's mask to (tensor or None, causal, window) for the kernel."""
    window = config.get("window")
    if attn_mask is None:
        return None, is_causal, window
    if config.get("mask_static", False):
        # rewrite_id is unique per rewritten site (see attnopt.rewriter.rewrite); without it the
        # whole config string keys the cache, never the site name alone.
        ident = config.get("rewrite_id", json.dumps(config, sort_keys=True))
        key = (ident, tuple(attn_mask.shape) + (q_len, kv_len), str(attn_mask.device))
        kind = _STATIC_MASK_KINDS.get(key)
        if kind is None:
            allowed = additive_to_allowed(attn_mask)
            kind = (
                ("bias", None)
                if allowed is None
                else classify_allowed(allowed.expand(*allowed.shape[:-2], q_len, kv_len))
            )
            _STATIC_MASK_KINDS[key] = kind
        name, win = kind
        if name == "none":
            return None, is_causal, window
        if name == "causal":
            return None, True, window
        if name == "sliding_window":
            return None, True, win
    elif variant:
        # A mask that may depend on input values cannot be cached, but a variant needs its
        # structure: classify this call's mask (an O(Nq*Nk) check; exact attention skips it).
        allowed = additive_to_allowed(attn_mask)
        if allowed is not None:
            name, win = classify_allowed(allowed.expand(*allowed.shape[:-2], q_len, kv_len))
            if name == "none":
                return None, is_causal, window
            if name == "causal":
                return None, True, window
            if name == "sliding_window":
                return None, True, win
    return attn_mask, is_causal, window


def _allows_every_key(mask: torch.Tensor) -> bool:
    """Whether a boolean or additive mask masks nothing (one pass over the mask, no copy)."""
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def exact_attention(call: AttentionCall) -> torch.Tensor:
    """The fastest dense path: ``F.scaled_dot_product_attention`` with attnopt's conventions.

    On a CPU, a mask that masks nothing is dropped before SDPA. Hugging Face encoders pass one
    (built from ``attention_mask``) even for unpadded batches, and SDPA's CPU kernel reads it for
    every block: at batch 2, 12 heads, N=256, head dim 32 it makes the call 35% slower (2.90 ms
    against 2.14 ms on the 2-core CI CPU). The check is one pass over the mask. It runs on CPUs
    only, where reading the answer back costs no stream sync.
    """
    q, k, v = call.q, call.k, call.v
    q_len, kv_len = q.shape[-2], k.shape[-2]
    mask = call.attn_mask
    if mask is not None and q.device.type == "cpu" and _allows_every_key(mask):
        mask = None
    is_causal = False
    structural = None
    if call.window:
        structural = combined_allowed(q_len, kv_len, causal=True, window=call.window, device=q.device)
    elif call.causal:
        if q_len == kv_len:
            is_causal = mask is None
            if mask is not None:
                structural = combined_allowed(q_len, kv_len, causal=True, window=None, device=q.device)
        elif q_len > 1:
            structural = combined_allowed(q_len, kv_len, causal=True, window=None, device=q.device)
        # q_len == 1: a single query at the end of the sequence sees every key.
    mask = merge_allowed(mask, structural)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    # GQA without copying K/V per query head (a 268 MB copy per site at 32 heads, N=32768, bf16),
    # except for masked calls on CUDA, whose memory-efficient backend does not take enable_gqa
    # (SDPA would fall back to its math path: slower than the copy).
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.device.type != "cpu":
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=call.scale, enable_gqa=gqa
    )


def _top_left_causal(attn_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """SDPA's own ``is_causal`` is top-left aligned; express it as a mask when Nq != Nk."""
    return merge_allowed(attn_mask, torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril())


def _run(family: str, q, k, v, attn_mask, params, scale, is_causal, config) -> torch.Tensor:
    cfg = parse_config(config)
    site = cfg.get("site", "")
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if is_causal and q_len != kv_len and cfg.get("causal_align") == "top_left":
        attn_mask, is_causal = _top_left_causal(attn_mask, q_len, kv_len, q.device), False
    if family != "exact" and (q_len < int(cfg.get("min_q_len", 2)) or kv_len < int(cfg.get("min_kv_len", 0))):
        family = "exact"  # decode steps, and contexts shorter than where the plan's variant pays off
    hook = _HOOK.get()
    # Classify per call where the structure matters: variants, and hooked calls (calibration's
    # samples, which variants are fitted on; a planner's variant). Plain exact attention just
    # passes the model's mask to SDPA.
    variant = family != "exact" or (hook is not None and hook.wants_structure(site))
    mask, causal, window = _resolve_mask(attn_mask, q_len, kv_len, is_causal, cfg, variant)
    # One query (a decode step) at the end of the keys sees every key whether or not the call
    # says causal (attnopt's causal is bottom-right): give every kernel the causal form.
    causal = causal or q_len == 1
    if not params and "params_ref" in cfg:
        params = _banked(cfg["params_ref"], site)
    call = AttentionCall(q, k, v, mask, list(params), float(scale), causal, window, cfg)
    if hook is not None:
        family = hook(site, family, call)
    kernel = KERNELS.get((family, q.device.type)) or KERNELS.get((family, "any"))
    if kernel is None:
        raise NotImplementedError(
            f"attnopt::{family} has no kernel for device {q.device.type!r} (site {site or '?'}); "
            f"registered: {sorted(KERNELS)}."
        )
    try:
        out = kernel(call)
    except Exception as e:
        # An installed plan's variant on a call it was never planned for (a shape, a mask) must
        # not crash a model mid-generation: exact attention serves the call, and the site is
        # named once. Planning's calls (no "fallback" key) and hooked calls re-raise, so a broken
        # candidate fails its measurement instead of passing for exact.
        if family == "exact" or not cfg.get("fallback") or hook is not None:
            raise
        _warn_fallback(site, family, e)
        out = exact_attention(call)
    out = out if out.dtype == v.dtype else out.to(v.dtype)
    # The contract (and the fake kernel) is a contiguous (B, H, Nq, Dv) tensor; SDPA's CPU
    # flash kernel returns a transposed view, which compilers checking strides would reject.
    return out.contiguous()


#: (site, family, error type) already warned about: one warning each per process (bounded: a
#: process that keeps failing on new sites warns again for the oldest ones, never grows without end).
_FALLBACKS_WARNED: BoundedCache[tuple[str, str, str], bool] = BoundedCache("ops.fallbacks_warned", 4096)


def _warn_fallback(site: str, family: str, error: Exception) -> None:
    key = (site, family, type(error).__name__)
    if not _FALLBACKS_WARNED.add(key):
        return
    first = (str(error).strip().splitlines() or [""])[0][:200]
    warnings.warn(
        f"attnopt: the {family} kernel failed at site {site or '?'} ({type(error).__name__}: {first}); "
        "exact attention serves such calls there (warned once).",
        RuntimeWarning,
        stacklevel=3,
    )


class BankedParams:
    """A site's fitted tensors kept outside a compiled graph, for as long as their owner holds them."""

    __slots__ = ("tensors", "__weakref__")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = list(tensors)


#: ``params_ref`` -> banked tensors, held weakly: an entry lives exactly as long as the compiled
#: graph that owns it (see :func:`bank_params`), so compiling and dropping models never grows it.
_PARAM_BANK: weakref.WeakValueDictionary[str, BankedParams] = weakref.WeakValueDictionary()
_BANK_KEYS = itertools.count()


def bank_params(tensors: list[torch.Tensor]) -> tuple[str, BankedParams]:
    """Keep a site's fitted tensors on the Python side: ``(params_ref, entry)``.

    For graphs handed to a compiler that accepts only the parameters and buffers it recorded
    itself (Inductor under ``torch.compile``): the operator is then called with ``params=[]``
    and a config holding ``"params_ref"``, and looks the tensors up at run time. The bank
    holds ``entry`` weakly: the caller must keep it alive with what it serves (the compiled
    function), and it is freed with it.
    """
    entry = BankedParams(tensors)
    key = f"bank{next(_BANK_KEYS)}"
    _PARAM_BANK[key] = entry
    return key, entry


def _banked(ref: str, site: str) -> list[torch.Tensor]:
    entry = _PARAM_BANK.get(ref)
    if entry is None:
        raise RuntimeError(
            f"attnopt: the fitted tensors of site {site or '?'} ({ref}) were freed with the graph that "
            "owned them; recompile the model."
        )
    return entry.tensors


def _define(family: str) -> None:
    qualname = f"attnopt::{family}"

    @torch.library.custom_op(qualname, mutates_args=(), schema=_SCHEMA)
    def _op(q, k, v, attn_mask, params, scale, is_causal, config):  # noqa: ANN001
        return _run(family, q, k, v, attn_mask, params, scale, is_causal, config)

    @_op.register_fake
    def _fake(q, k, v, attn_mask, params, scale, is_causal, config):  # noqa: ANN001
        return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


for _family in FAMILY_OPS:
    _define(_family)

register_kernel("exact", "any")(exact_attention)


def op_for(family: str) -> torch._ops.OpOverload:
    """The ``torch.ops.attnopt.<family>.default`` overload a rewritten graph calls."""
    if family not in FAMILY_OPS:
        raise ValueError(f"Expected a family with an operator {FAMILY_OPS}, but got {family!r}.")
    return getattr(torch.ops.attnopt, family).default
