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
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from attnopt.patterns.masks import additive_to_allowed, classify_allowed, combined_allowed, merge_allowed

__all__ = [
    "FAMILY_OPS",
    "KERNELS",
    "AttentionCall",
    "register_kernel",
    "op_for",
    "exact_attention",
    "parse_config",
    "set_observer",
    "overrides",
]

#: Families with an operator of their own. ``head_pruned`` is a weight rewrite that runs the
#: ``exact`` operator with fewer heads, so it has none.
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
            cfg = _FAMILY_CONFIGS[key] = config_type.from_json(raw)
        return cfg


_C = TypeVar("_C")
_FAMILY_CONFIGS: dict[tuple[str, str], Any] = {}

Kernel = Callable[[AttentionCall], torch.Tensor]

# Called as ``observer(site_name, call)`` before each kernel runs; calibration installs one.
_OBSERVER: Callable[[str, AttentionCall], None] | None = None


# site name -> (family, config dict, params): lets the planner try a plan on a model that runs
# exact operators, without recapturing or recompiling anything.
_OVERRIDES: dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]] = {}


class overrides:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, run ``site``'s operator as ``(family, config, params)`` instead."""

    def __init__(self, table: dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]]) -> None:
        self.table = table

    def __enter__(self) -> overrides:
        self._saved = dict(_OVERRIDES)
        _OVERRIDES.clear()
        _OVERRIDES.update(self.table)
        return self

    def __exit__(self, *exc: object) -> None:
        _OVERRIDES.clear()
        _OVERRIDES.update(self._saved)


def _head_pruned_emulation(call: AttentionCall) -> torch.Tensor:
    """Exact attention with the pruned heads' outputs set to their fill (or zero): what the model
    computes once the q/k/v/o projections are sliced and the fill folded into the o-bias."""
    from attnopt.replacements.head_pruned import pruned_output

    fill = call.params[1] if len(call.params) > 1 else None
    return pruned_output(exact_attention(call), call.params[0], fill)


def set_observer(observer: Callable[[str, AttentionCall], None] | None) -> Callable | None:
    """Install ``observer`` (or None); returns the previous one so callers can restore it."""
    global _OBSERVER
    previous, _OBSERVER = _OBSERVER, observer
    return previous


#: (family, device type) -> kernel. ``"exact"`` on every device is registered below.
KERNELS: dict[tuple[str, str], Kernel] = {}


def register_kernel(family: str, device_type: str) -> Callable[[Kernel], Kernel]:
    """Decorator: make ``fn(call) -> Tensor`` the kernel of ``family`` on ``device_type``."""
    if family not in FAMILY_OPS:
        raise ValueError(f"Expected a family in {FAMILY_OPS}, but got {family!r}.")

    def deco(fn: Kernel) -> Kernel:
        KERNELS[(family, device_type)] = fn
        return fn

    return deco


@functools.lru_cache(maxsize=4096)
def _parse_config_cached(config: str) -> dict[str, Any]:
    return json.loads(config) if config else {}


def parse_config(config: str) -> dict[str, Any]:
    """The operator's JSON config as a dict (cached: the same string comes every call)."""
    return _parse_config_cached(config)


# Static masks depend only on shapes, so their kind at a shape never changes: check once.
_STATIC_MASK_KINDS: dict[tuple[object, tuple[int, ...], str], tuple[str, int | None]] = {}


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
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if is_causal and q_len != kv_len and cfg.get("causal_align") == "top_left":
        attn_mask, is_causal = _top_left_causal(attn_mask, q_len, kv_len, q.device), False
    if family != "exact" and (q_len < int(cfg.get("min_q_len", 2)) or kv_len < int(cfg.get("min_kv_len", 0))):
        family = "exact"  # decode steps, and contexts shorter than where the plan's variant pays off
    # Classify per call where the structure matters: variants, and calibration (whose samples
    # variants are fitted on). Plain exact attention just passes the model's mask to SDPA.
    variant = (
        family != "exact" or _OBSERVER is not None or bool(_OVERRIDES and cfg.get("site", "") in _OVERRIDES)
    )
    mask, causal, window = _resolve_mask(attn_mask, q_len, kv_len, is_causal, cfg, variant)
    # One query (a decode step) at the end of the keys sees every key whether or not the call
    # says causal (attnopt's causal is bottom-right): give every kernel the causal form.
    causal = causal or q_len == 1
    if not params and "params_ref" in cfg:
        params = _PARAM_BANK[cfg["params_ref"]]
    call = AttentionCall(q, k, v, mask, list(params), float(scale), causal, window, cfg)
    if _OBSERVER is not None:
        _OBSERVER(cfg.get("site", ""), call)
    override = _OVERRIDES.get(cfg.get("site", "")) if _OVERRIDES else None
    if override is not None:
        family, inner, call.params = override[0], override[1], list(override[2])
        call.config = {**cfg, "family": family, "config": inner}
        if family == "head_pruned":
            return _head_pruned_emulation(call).to(v.dtype).contiguous()
    kernel = KERNELS.get((family, q.device.type)) or KERNELS.get((family, "any"))
    if kernel is None:
        raise NotImplementedError(
            f"attnopt::{family} has no kernel for device {q.device.type!r} (site {cfg.get('site', '?')}); "
            f"registered: {sorted(KERNELS)}."
        )
    out = kernel(call)
    out = out if out.dtype == v.dtype else out.to(v.dtype)
    # The contract (and the fake kernel) is a contiguous (B, H, Nq, Dv) tensor; SDPA's CPU
    # flash kernel returns a transposed view, which compilers checking strides would reject.
    return out.contiguous()


_PARAM_BANK: dict[str, list[torch.Tensor]] = {}


def bank_params(tensors: list[torch.Tensor]) -> str:
    """Keep a site's fitted tensors on the Python side; returns the ``params_ref`` naming them.

    For graphs handed to a compiler that accepts only the parameters and buffers it recorded
    itself (Inductor under ``torch.compile``): the operator is then called with ``params=[]``
    and a config holding ``"params_ref"``, and looks the tensors up here at run time.
    """
    key = f"bank{len(_PARAM_BANK)}"
    _PARAM_BANK[key] = list(tensors)
    return key


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
