"""The plan under ``torch.export.export(optimized_model, ...)``.

An optimised model's ``forward`` runs a dynamo-captured, rewritten graph; ``torch.export``
does not run that (it traces the Python ``forward`` itself), so without help the exported
program would hold the model's original attention. While exporting, the installed ``forward``
therefore runs the original one under :class:`PlannedSdpa`, a ``TorchFunctionMode`` that
replaces every ``scaled_dot_product_attention`` call the plan covers with the plan's
``torch.ops.attnopt.<family>`` operator — the same operator, configuration and fitted tensors
the rewritten graph calls, so the program computes what the optimised model computes.

Sites are recognised by name, ``<owning module path>#<index>``, exactly as the graph matchers
name them: the owning module is the innermost module running when the call happens (tracked
with global forward hooks for the duration), the index counts that module's attention calls
in this forward. Attention the model writes by hand (matmul, softmax, matmul) has no single
call to intercept; such planned sites are exported as written, with a warning pointing to
:func:`attnopt.export`, which rewrites the exported graph instead and covers every form.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnopt.codegen.ops import op_for
from attnopt.rewriter.rewrite import Choice, op_config, op_family

__all__ = ["PlannedSdpa", "planned_sdpa"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class PlannedSdpa(TorchFunctionMode):
    """Route the planned sites' ``F.scaled_dot_product_attention`` calls to attnopt operators.

    Args:
        root: the module whose ``forward`` runs under the mode (an installed part).
        choices: the plan's choice per site name (as the installed backend sees them).
        prefix: ``root``'s path inside the user's model ('' for the model itself).
    """

    def __init__(self, root: torch.nn.Module, choices: Mapping[str, Choice], prefix: str = "") -> None:
        super().__init__()
        self.choices = dict(choices)
        self.paths = {
            id(m): ".".join(p for p in (prefix, name) if p) for name, m in root.named_modules()
        }
        self.stack: list[str] = [prefix]
        self.calls: collections.Counter[str] = collections.Counter()
        self.rewritten: list[str] = []

    # -- module tracking --------------------------------------------------------------------
    def _enter(self, module: torch.nn.Module, *_: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None:
            self.stack.append(path)

    def _leave(self, module: torch.nn.Module, *_: Any) -> None:
        if id(module) in self.paths and len(self.stack) > 1:
            self.stack.pop()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[PlannedSdpa]:
        """Track the running module (global forward hooks) and intercept calls, for one forward."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        pre = register_module_forward_pre_hook(self._enter)
        post = register_module_forward_hook(self._leave, always_call=True)
        try:
            with self:
                yield self
        finally:
            pre.remove()
            post.remove()

    # -- interception -----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self._planned(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _planned(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        call = dict(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        owner = self.stack[-1]
        name = f"{owner}#{self.calls[owner]}"
        self.calls[owner] += 1
        choice = self.choices.get(name)
        q, k, v = call["query"], call["key"], call["value"]
        if choice is None or call.get("dropout_p", 0.0) or q.dim() != 4 or k.dim() != 4:
            return None
        scale = call.get("scale")
        # The model's mask may depend on input values: the operator classifies it per call.
        config = op_config(name, choice, mask_static=False, causal_align="top_left")  # SDPA's is_causal
        self.rewritten.append(name)
        return op_for(op_family(choice))(
            q,
            k,
            v,
            call.get("attn_mask"),
            list(choice.params),
            float(q.shape[-1] ** -0.5 if scale is None else scale),
            bool(call.get("is_causal", False)),
            config,
        )


def planned_sdpa(root: torch.nn.Module, choices: Mapping[str, Choice], prefix: str, run) -> Any:
    """``run()`` (the original forward) with the planned SDPA sites routed to attnopt operators.

    Warns, naming them, about planned non-exact sites no SDPA call reached (hand-written
    attention), since the program then computes those sites exactly.
    """
    mode = PlannedSdpa(root, choices, prefix)
    with mode.tracking():
        out = run()
    missed = sorted(n for n, c in choices.items() if c.family != "exact" and n not in mode.rewritten)
    if missed:
        warnings.warn(
            f"attnopt: torch.export traced planned site(s) {', '.join(missed)} with their original attention "
            "(not written as scaled_dot_product_attention); use attnopt.export(model, example) for a program "
            "with every planned site rewritten.",
            stacklevel=3,
        )
    return out
