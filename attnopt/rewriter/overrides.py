"""Run a plan's variants on a model whose sites run exact operators, without rewriting it again.

From calibration on, every site of the model being planned runs ``attnopt::exact``; trying a
plan end to end (validation, one-site errors, the registry route's check) redirects those
calls to the plan's variants through the operators' one hook
(:class:`~attnopt.codegen.ops.DispatchHook`), so nothing is recaptured or recompiled.
"""

from __future__ import annotations

from typing import Any

import torch

from attnopt.codegen.ops import AttentionCall, DispatchHook, dispatch_hook

__all__ = ["OverrideTable", "overrides", "plan_overrides"]

#: site name -> (family, config dict, fitted tensors): what the site runs instead.
OverrideTable = dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]]


class _Overrides(DispatchHook):
    def __init__(self, table: OverrideTable) -> None:
        self.table = table

    def wants_structure(self, site: str) -> bool:
        return site in self.table

    def __call__(self, site: str, family: str, call: AttentionCall) -> str:
        override = self.table.get(site)
        if override is None:
            return family
        family, inner, params = override
        call.params = list(params)
        call.config = {**call.config, "family": family, "config": inner}
        return family


class overrides:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, run each ``site`` of ``table`` as ``(family, config, params)`` instead.

    Nests: an inner block replaces the outer table and restores it on exit.
    """

    def __init__(self, table: OverrideTable) -> None:
        self.table = table

    def __enter__(self) -> overrides:
        self._ctx = dispatch_hook(_Overrides(dict(self.table)))
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def plan_overrides(plan: Any) -> OverrideTable:
    """The override table of a :class:`~attnopt.cost_model.plan.Plan`: its non-exact entries."""
    return {e.site: (e.family, e.config, list(e.params)) for e in plan.entries if e.family != "exact"}
