"""Install a plan on a module so the *same object* runs the rewritten attention.

``optimize()`` must return the user's model itself — same class, same methods, so a Hugging
Face model still ``generate()``s. The module's ``forward`` is replaced (on the instance only)
by a dynamo-captured version whose backend rewrites the attention sites per the plan and runs
the rest of the graph as the model wrote it. Shapes the plan has not seen are captured anew;
anything dynamo cannot capture runs eagerly, unchanged. :func:`uninstall` restores the module.
"""

from __future__ import annotations

import torch

from attnopt.rewriter.backend import ChoiceFn, RewriteBackend

__all__ = ["install", "uninstall", "installed_backend"]

_ATTR = "_attnopt_backend"


def install(model: torch.nn.Module, choose: ChoiceFn) -> torch.nn.Module:
    """Make ``model.forward`` run with attention rewritten by ``choose``; returns ``model``."""
    uninstall(model)
    import torch._dynamo

    # One model may need a graph per input shape (prefill, decode, other lengths).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    backend = RewriteBackend(choose)
    original = model.forward
    compiled = torch.compile(original, backend=backend, dynamic=None)
    model.forward = compiled
    setattr(model, _ATTR, (backend, original))
    return model


def uninstall(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`install` (no-op on a module without an installed plan)."""
    state = model.__dict__.pop(_ATTR, None)
    if state is not None:
        model.__dict__.pop("forward", None)
    return model


def installed_backend(model: torch.nn.Module) -> RewriteBackend | None:
    """The backend installed on ``model`` (for reports and tests), or None."""
    state = model.__dict__.get(_ATTR)
    return state[0] if state else None
