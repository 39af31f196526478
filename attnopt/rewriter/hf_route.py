"""Run a plan on a Hugging Face model through transformers' own attention registry.

Hugging Face attention modules do not call attention directly: they look the function up in
``transformers.AttentionInterface`` under ``config._attn_implementation`` (and the mask builder
in ``transformers.masking_utils.AttentionMaskInterface`` under the same key). That is how
FlashAttention and FlexAttention plug in, and it is the cheapest way to run a plan: the model
keeps its own Python forward, its fast paths and its mask shortcuts (a plain causal or unpadded
batch builds no mask at all), with no captured graph around it. The graph path
(:mod:`attnopt.rewriter.install`) costs per call what a captured forward costs, and a
materialised causal mask on top: 0.82-0.94x on codelm with an all-exact plan.

:func:`route` registers one function under the name ``"attnopt"``, points the site modules'
configs at it and gives each attention module a :class:`SiteRoute` (its site name and the
plan's choice). Exact sites call transformers' SDPA function, as the graph path's exact
operator calls SDPA; the others call the plan's ``torch.ops.attnopt.<family>`` operator with
the same configuration and fitted tensors the graph rewrite would, so both paths compute the
same. Because the model's forward is untouched, ``torch.compile(model)`` traces through the
routed function like any other, head-pruned plans included.

A model that changes after routing is caught at the call: an attention module without a route
(a layer added) or whose q/k/v have other head counts than planned (heads pruned by hand)
raises :class:`~attnopt.rewriter.verify.PlanMismatchError`; the first call also checks that
every routed site was reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from attnopt.codegen.ops import op_for
from attnopt.rewriter.rewrite import Choice, op_config, op_family
from attnopt.rewriter.verify import PlanMismatchError, SiteCoverage, site_module

__all__ = ["ROUTE_NAME", "SiteRoute", "route_reason", "route", "unroute", "routed_sites", "suspended"]

log = logging.getLogger("attnopt.rewriter")

#: The ``attn_implementation`` name routed configs carry while a plan is installed.
ROUTE_NAME = "attnopt"

_ATTR = "_attnopt_route"
_ROOT_ATTR = "_attnopt_route_root"
_HOOK_ATTR = "_attnopt_route_check"

#: Keyword arguments of transformers' attention functions that change what attention computes
#: beyond q, k, v, mask and scale; a call carrying one runs the exact function, which knows them.
_SPECIAL_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")


@dataclasses.dataclass
class SiteRoute:
    """What one routed attention module runs, and the shapes the plan was made for.

    ``num_heads``/``num_kv_heads``/``head_dim`` are compared with every call's q and k (three
    integer comparisons), so a module changed after planning is named at its next call.
    ``config`` is the operator's JSON config (``None`` for exact sites).
    """

    site: str
    choice: Choice
    config: str | None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    coverage: SiteCoverage | None = None

    def check(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Raise :class:`PlanMismatchError` if q/k do not have the planned head counts."""
        got = {"num_heads": query.shape[1], "num_kv_heads": key.shape[1], "head_dim": query.shape[-1]}
        want = {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        if self.coverage is not None:
            self.coverage.note(self.site, got)
        diff = [f"{k} {want[k]}->{got[k]}" for k in got if want[k] is not None and want[k] != got[k]]
        if diff:
            raise PlanMismatchError(
                f"Expected site {self.site} to run the attention its plan was made for, but {', '.join(diff)}. "
                "The model changed after planning: re-plan it with attnopt.optimize() or attnopt.plan()."
            )


_REGISTRIES: tuple[Any, ...] | None = None


def _transformers() -> tuple[Any, ...] | None:
    """transformers' attention and mask registries (looked up once), or None where they are missing."""
    global _REGISTRIES
    if _REGISTRIES is not None:
        return _REGISTRIES
    if "transformers" not in sys.modules:
        return None  # a model built without transformers is not a transformers model
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return None
    _REGISTRIES = (AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask)
    return _REGISTRIES


def _dispatches(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward looks its attention function up in transformers' registry."""
    forward = getattr(type(module), "forward", None)
    # transformers wraps forwards in decorators (functools.wraps keeps __wrapped__).
    code = getattr(inspect.unwrap(forward), "__code__", None) if forward is not None else None
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _config(module: torch.nn.Module) -> Any | None:
    config = getattr(module, "config", None)
    return config if hasattr(type(config), "_attn_implementation") else None


def route_reason(model: torch.nn.Module, site_names: list[str]) -> str | None:
    """Why the plan's sites cannot be routed through transformers' registry, or None if they can.

    Every site must be the only attention of a module that dispatches through
    ``ALL_ATTENTION_FUNCTIONS`` and carries a transformers config using SDPA or eager attention.
    """
    if _transformers() is None:
        return "transformers' AttentionInterface is not available"
    if not site_names:
        return "the plan has no sites"
    for name in site_names:
        if not name.endswith("#0"):
            return f"site {name} is not its module's only attention call"
        path = site_module(name)
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            return f"module {path!r} of site {name} is not in the model"
        config = _config(module)
        if config is None or not _dispatches(module):
            return (
                f"{type(module).__name__} ({path}) does not dispatch through transformers' AttentionInterface"
            )
        if _original(config) not in ("sdpa", "eager"):
            return f"{path} runs attn_implementation {_original(config)!r}"
    return None


# -- installing -------------------------------------------------------------------------------

#: Configs routed now: id -> (weak reference, the implementation they had before). An entry goes
#: on :func:`unroute`, or when its config is freed with a model that was dropped while routed.
_ROUTED: dict[int, tuple[weakref.ref, str]] = {}


def _drop_route(key: int, ref: weakref.ref) -> None:
    """The callback of a routed config's weak reference: forget the entry when the config is freed."""
    if _ROUTED.get(key, (None,))[0] is ref:
        del _ROUTED[key]


def _original(config: Any) -> str | None:
    current = config._attn_implementation
    if current == ROUTE_NAME:
        entry = _ROUTED.get(id(config))
        return entry[1] if entry is not None and entry[0]() is config else "sdpa"
    return current


def _register() -> None:
    """Put :func:`attention` and the SDPA mask builder under :data:`ROUTE_NAME` (idempotent)."""
    attention_interface, mask_interface, _, sdpa_mask = _transformers()
    attention_interface.register(ROUTE_NAME, attention)
    # Routed sites take SDPA's masks: a boolean mask, or none at all for a plain causal or
    # unpadded batch (what the graph path's exact operator reduces masks to as well).
    mask_interface.register(ROUTE_NAME, sdpa_mask)


def route(
    model: torch.nn.Module,
    choices: Mapping[str, Choice],
    expected: Mapping[str, Mapping[str, Any]] | None = None,
) -> bool:
    """Route ``choices`` (site name -> choice) on ``model``; False (nothing changed) if it cannot.

    ``expected`` (site name -> planned structure) gives the head counts each call is checked
    against and arms a first-call check that every routed site is reached.
    """
    reason = route_reason(model, list(choices))
    if reason is not None:
        log.info("attnopt: planned sites run through the graph rewrite (%s)", reason)
        return False
    unroute(model)
    _register()
    # The first-call check covers the routed sites; others of the plan run the model's own code.
    coverage = SiteCoverage({n: st for n, st in expected.items() if n in choices}) if expected else None
    routed_modules = {site_module(n): n for n in choices}
    configs = {}
    for path, module in model.named_modules():
        config = _config(module)
        if config is None or not _dispatches(module):
            continue
        name = routed_modules.get(path)
        if name is None:
            continue  # not planned: its config is left alone unless a planned module shares it
        want = (expected or {}).get(name, {})
        choice = choices[name]
        config_json = None
        if op_family(choice) != "exact":
            config_json = op_config(name, choice, mask_static=False, causal_align="top_left")
        module.__dict__[_ATTR] = SiteRoute(
            name,
            choice,
            config_json,
            want.get("num_heads"),
            want.get("num_kv_heads"),
            want.get("head_dim"),
            coverage,
        )
        configs[id(config)] = config
    # Attention modules sharing a routed config but absent from the plan (sites found but not
    # rewritable) run transformers' SDPA function exactly, as the graph path leaves them.
    for path, module in model.named_modules():
        if _ATTR not in module.__dict__ and _dispatches(module) and id(_config(module)) in configs:
            module.__dict__[_ATTR] = SiteRoute(f"{path}#0", Choice("exact"), None)
    for config in configs.values():
        original = _original(config)
        _ROUTED[id(config)] = (weakref.ref(config, functools.partial(_drop_route, id(config))), original)
        config._attn_implementation = ROUTE_NAME
    if coverage is not None:
        _arm_first_call_check(model)
    model.__dict__[_ROOT_ATTR] = list(configs.values())
    return True


def _arm_first_call_check(model: torch.nn.Module) -> None:
    """After the next forward of ``model``, raise if a routed site was not reached.

    The hook reads everything from the module it runs on (not from this closure), so a deep copy
    of a routed model checks its own routes.
    """
    model.__dict__[_HOOK_ATTR] = model.register_forward_hook(_first_call_check)


def _first_call_check(module: torch.nn.Module, _args: Any, _out: Any) -> None:
    if any(c._attn_implementation != ROUTE_NAME for c in module.__dict__.get(_ROOT_ATTR, [])):
        return  # the route was suspended for this call (attnopt.export): check the next one
    handle = module.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    coverage = None
    for m in module.modules():
        r = m.__dict__.get(_ATTR)
        if r is not None and r.coverage is not None:
            coverage, r.coverage = r.coverage, None
    if coverage is not None:
        coverage.check(type(module).__name__)


def unroute(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`route` on ``model`` (no-op where nothing is routed)."""
    configs = model.__dict__.pop(_ROOT_ATTR, None) or []
    hook = model.__dict__.pop(_HOOK_ATTR, None)
    if hook is not None:
        hook.remove()  # a first-call check still pending
    for _, m in model.named_modules():
        m.__dict__.pop(_ATTR, None)
    for config in configs:
        entry = _ROUTED.pop(id(config), None)
        if config._attn_implementation == ROUTE_NAME:
            config._attn_implementation = entry[1] if entry is not None else "sdpa"
    return model


def routed_sites(model: torch.nn.Module) -> dict[str, str]:
    """Site name -> family of every routed attention module of ``model`` (for reports and tests)."""
    return {
        r.site: r.choice.family for _, m in model.named_modules() if (r := m.__dict__.get(_ATTR)) is not None
    }


@contextlib.contextmanager
def suspended(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with its configs' own attention implementation (for ``attnopt.export``,
    which finds the sites in the exported graph and rewrites them itself)."""
    configs = model.__dict__.get(_ROOT_ATTR) or []
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in saved:
            c._attn_implementation = _original(c)
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


# -- the routed attention function ------------------------------------------------------------


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, running the module's planned choice.

    q/k/v arrive as ``(B, H, N, D)`` with K/V on their own (GQA) head count; the output is
    ``(B, N, H, D)``, as transformers' attention functions return it.
    """
    sdpa_attention_forward = _transformers()[2]
    r = module.__dict__.get(_ATTR)
    if r is None:
        raise PlanMismatchError(
            f"Expected every attention module running with attn_implementation={ROUTE_NAME!r} to be in the "
            f"installed plan, but a {type(module).__name__} is not (was a layer added after planning?). "
            "Re-plan the model with attnopt.optimize() or attnopt.plan()."
        )
    r.check(query, key)
    if (
        r.config is None
        or dropout
        or query.dim() != 4
        or any(kwargs.get(k) is not None for k in _SPECIAL_KWARGS)
        or kwargs.get("output_attentions")
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # transformers' SDPA rule: the flag holds only without a mask and beyond one query.
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    out = op_for(op_family(r.choice))(
        query, key, value, attention_mask, list(r.choice.params), scale, causal, r.config
    )
    return out.transpose(1, 2).contiguous(), None
