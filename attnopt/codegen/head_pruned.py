"""The ``head_pruned`` kernel: the pruned model's attention output, on the unpruned model.

Head pruning is a weight rewrite (the q/k/v/o projections are sliced, see
:func:`attnopt.replacements.head_pruned.apply_head_pruning`), so it has no operator of its
own. Before the weights change, a planner trying the plan end to end redirects the site's
exact operator here (through :class:`~attnopt.codegen.ops.DispatchHook`): exact attention
with the pruned heads' outputs set to their fill, which is what the sliced model computes once
the fill is folded into the output projection's bias. Device-agnostic: it runs the exact path.
"""

from __future__ import annotations

import torch

from attnopt.codegen.ops import AttentionCall, exact_attention, register_kernel
from attnopt.replacements.head_pruned import pruned_output

__all__ = ["head_pruned_emulation"]


@register_kernel("head_pruned", "any")
def head_pruned_emulation(call: AttentionCall) -> torch.Tensor:
    """Exact attention with the heads outside ``params[0]`` set to ``params[1]`` (or zero)."""
    fill = call.params[1] if len(call.params) > 1 else None
    return pruned_output(exact_attention(call), call.params[0], fill)
