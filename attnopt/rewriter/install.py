"""Install a plan on a module so the *same object* runs the rewritten attention.

``optimize()`` must return the user's model itself — same class, same methods, so a Hugging
Face model still ``generate()``s. The module's ``forward`` is replaced (on the instance only)
by a dynamo-captured version whose backend rewrites the attention sites per the plan and runs
the rest of the graph as the model wrote it. Shapes the plan has not seen are captured anew;
anything dynamo cannot capture runs eagerly, unchanged. Under ``torch.export`` the original
``forward`` is traced with the plan's SDPA sites routed to attnopt operators
(:mod:`attnopt.rewriter.export_mode`). :func:`uninstall` restores the module.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnopt.rewriter.backend import ChoiceFn, RewriteBackend, WeakBackend
from attnopt.rewriter.export_mode import planned_sdpa
from attnopt.rewriter.hf_route import routed_sites, unroute
from attnopt.rewriter.rewrite import Choice
from attnopt.rewriter.verify import SiteCoverage

__all__ = [
    "install",
    "uninstall",
    "uninstall_all",
    "installed_backend",
    "installed_backends",
    "describe_installation",
]

_ATTR = "_attnopt_backend"


def install(
    model: torch.nn.Module,
    choose: ChoiceFn,
    prefix: str = "",
    choices: Mapping[str, Choice] | None = None,
    expected: Mapping[str, Mapping[str, Any]] | None = None,
) -> torch.nn.Module:
    """Make ``model.forward`` run with attention rewritten by ``choose``; returns ``model``.

    ``prefix`` is ``model``'s path inside the user's model when a plan is installed on a
    captured part (see :func:`attnopt.rewriter.capture.capture_parts`). ``choices`` (the plan
    per site name) also makes ``torch.export.export(model, ...)`` produce the plan's operators
    for sites written with ``scaled_dot_product_attention`` (see :mod:`attnopt.rewriter.export_mode`).
    ``expected`` (planned site name -> structure, for the sites under ``prefix``) makes the first
    call, and every call that captures a new graph, check that the model still runs exactly
    these sites with these shapes (:class:`~attnopt.rewriter.verify.SiteCoverage`): a plan that
    matches nothing raises :class:`~attnopt.rewriter.verify.PlanMismatchError` instead of
    silently running the model unoptimised.
    """
    uninstall(model)
    import torch._dynamo

    # One model may need a graph per input shape (prefill, decode, other lengths).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    coverage = SiteCoverage(expected) if expected is not None else None
    backend = RewriteBackend(choose, prefix=prefix, root=model, coverage=coverage)
    original = model.forward
    checked = False
    compiled = torch.compile(_own_code(original), backend=WeakBackend(backend), dynamic=None)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        # nn.MultiheadAttention / TransformerEncoderLayer have a fused inference fast path that
        # hides the attention inside one opaque op; the rewritten graph needs it visible.
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            if choices is not None and torch.compiler.is_exporting():
                # torch.export traces the Python forward, not the compiled graph: route the
                # planned SDPA calls to attnopt operators while it does.
                return planned_sdpa(model, choices, prefix, lambda: original(*args, **kwargs))
            nonlocal checked
            compiles = len(backend.compiles)
            out = compiled(*args, **kwargs)
            if coverage is not None and (not checked or len(backend.compiles) != compiles):
                checked = True
                coverage.check(type(model).__name__ + (f" (part {prefix})" if prefix else ""))
            return out
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)

    model.forward = forward
    setattr(model, _ATTR, (backend, original))
    return model


_ENTRIES = itertools.count()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind an entry function whose code object belongs to this installation alone.

    Dynamo keeps compiled graphs on the code object of the function it compiles, keyed by
    backend, and drops an entry only with its code. Compiling each model's own
    ``Class.forward`` would leave one entry per optimised model on the shared class code, never
    evicted, until dynamo's recompile limit (64) stops compiling that class and the next model
    of it cannot run its plan. A per-installation entry point takes its entries with it when
    the model is freed; dynamo inlines ``fn`` into it.
    """

    def entry(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    name = f"attnopt_forward_{next(_ENTRIES)}"
    entry.__code__ = entry.__code__.replace(co_name=name, co_qualname=name)
    return entry


def uninstall(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`install` (no-op on a module without an installed plan)."""
    state = model.__dict__.pop(_ATTR, None)
    if state is not None:
        model.__dict__.pop("forward", None)
    return model


def installed_backend(model: torch.nn.Module) -> RewriteBackend | None:
    """The backend installed on ``model`` itself (for reports and tests), or None."""
    state = model.__dict__.get(_ATTR)
    return state[0] if state else None


def installed_backends(model: torch.nn.Module) -> dict[str, RewriteBackend]:
    """Every backend installed on ``model`` or its submodules, by module path."""
    return {name: m.__dict__[_ATTR][0] for name, m in model.named_modules() if _ATTR in m.__dict__}


def uninstall_all(model: torch.nn.Module) -> torch.nn.Module:
    """Undo every :func:`install` on ``model`` and its submodules, and any registry route
    (:func:`attnopt.rewriter.hf_route.route`)."""
    unroute(model)
    for _, m in model.named_modules():
        uninstall(m)
    return model


def describe_installation(model: torch.nn.Module) -> str:
    """How the plan installed on ``model`` runs, in words (for the demo, reports and benchmarks).

    One of: routed through transformers' AttentionInterface (the model's own forward runs), a
    dynamo-captured graph rewrite (the forward is replaced), or nothing installed (every site
    exact: the model runs as given).
    """
    routed = routed_sites(model)
    if routed:
        variants = sum(f not in ("exact", "head_pruned") for f in routed.values())
        return f"routed through transformers' AttentionInterface ({variants} of {len(routed)} site(s) on attnopt operators)"
    backends = installed_backends(model)
    if backends:
        return f"graph rewrite of {len(backends)} captured forward(s)"
    return "nothing installed: every site runs the model's own attention"
