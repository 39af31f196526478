"""Run a plan's variants on a model whose sites run exact operators, without rewriting it again.

From calibration on, every site of the model being planned runs ``attnopt::exact``; trying a
plan end to end (validation, one-site errors, the registry route's check) redirects those
calls to the plan's variants through the operators' one hook
(:class:`~attnopt.codegen.ops.DispatchHook`, applied by :class:`~attnopt.codegen.ops.overrides`),
so nothing is recaptured or recompiled. The table is the planner's, made here from a plan.
"""

from __future__ import annotations

from typing import Any

import torch

from attnopt.codegen.ops import overrides  # re-exported: the hook that applies a table

__all__ = ["OverrideTable", "overrides", "plan_overrides"]

#: site name -> (family, config dict, fitted tensors): what the site runs instead.
OverrideTable = dict[str, tuple[str, dict[str, Any], list[torch.Tensor]]]


def plan_overrides(plan: Any) -> OverrideTable:
    """The override table of a :class:`~attnopt.cost_model.plan.Plan`: its non-exact entries."""
    return {e.site: (e.family, e.config, list(e.params)) for e in plan.entries if e.family != "exact"}
