"""How much each head of a site matters: the ranking head pruning keeps the best of.

Two measures (see :mod:`attnopt.replacements.head_pruned`): the expected ``|dL/dg_h|`` of a
per-head gate, when a loss is available (Michel et al., 2019), and the head's contribution to
the site's output from calibration q/k/v, when it is not. Separate from the weight surgery
(:mod:`~attnopt.replacements.head_surgery`): ranking reads the model, surgery rewrites it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from attnopt.replacements.exact import attention_reference

__all__ = ["head_importance_from_gradients", "head_importance_from_stats", "head_mean_outputs"]

log = logging.getLogger("attnopt.replacements.head_pruned")


def head_importance_from_gradients(
    model: nn.Module,
    sites: Iterable[Any],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per-head importance ``sum_batches |dL/dg_h|`` of a unit gate on each head (Sixteen Heads).

    A forward pre-hook on each site's output projection (``site.projections["o"]``) multiplies
    the per-head slices of its input by gate parameters fixed at one, so the model's outputs are
    unchanged and the gate's gradient measures how much the loss leans on each head.

    Args:
        model: the model; its parameters and mode are left as they are (call ``model.eval()``
            first to keep dropout out of the measure).
        sites: the :class:`~attnopt.patterns.site.AttentionSite` records to score.
        batches: anything ``loss_fn`` accepts, one item per backward pass.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; it runs the model itself.

    Returns:
        ``{site.name: (num_heads,) float32 CPU tensor}``; zeros for a site that never ran.

    Raises:
        ValueError: a site has no output projection, or its input width is not heads x head_dim_v.
    """
    sites = list(sites)
    gates: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for site in sites:
            if "o" not in site.projections:
                raise ValueError(
                    f"Expected site {site.name} to have an output projection in site.projections, but got "
                    f"keys {sorted(site.projections)}. Score it with head_importance_from_stats instead."
                )
            o_proj = model.get_submodule(site.projections["o"])
            gate = torch.ones(site.num_heads, requires_grad=True)
            gates[site.name] = gate
            handles.append(o_proj.register_forward_pre_hook(_gate_hook(site, gate)))
        scores = {name: torch.zeros(g.shape[0]) for name, g in gates.items()}
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
                for name, grad in zip(gates, grads):
                    if grad is not None:
                        scores[name] += grad.detach().abs().float().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return scores


def _gate_hook(site: Any, gate: torch.Tensor) -> Callable:
    """A forward pre-hook that scales head ``h``'s slice of the projection input by ``gate[h]``."""
    heads, dv = site.num_heads, site.head_dim_v

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.shape[-1] != heads * dv:
            raise ValueError(
                f"Expected the output projection of {site.name} to read {heads} heads x {dv} = {heads * dv} "
                f"features, but got input width {x.shape[-1]}. Check the site's num_heads/head_dim_v."
            )
        g = gate.to(device=x.device, dtype=x.dtype).view(heads, 1)
        gated = (x.unflatten(-1, (heads, dv)) * g).flatten(-2)
        return (gated, *args[1:])

    return hook


def head_importance_from_stats(site: Any, stats: Any, o_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head contribution to the site's output on calibration samples.

    Head ``h``'s score is the mean over tokens and samples of ``||o_h W_o[:, h-slice]^T||``, where
    ``o_h`` is the head's exact attention output; with ``o_weight=None`` it is ``||o_h||`` (a weaker
    proxy that ignores how the output projection weighs heads). Heads are scored one at a time,
    so memory stays at one ``N x N`` score matrix.

    Args:
        site: the :class:`~attnopt.patterns.site.AttentionSite`.
        stats: its :class:`~attnopt.calibration.stats.SiteStats`.
        o_weight: ``(hidden, num_heads * head_dim_v)`` output-projection weight (``nn.Linear``
            layout), or None.

    Returns:
        ``(num_heads,)`` float32; zeros when ``stats`` holds no samples.
    """
    heads, dv = site.num_heads, site.head_dim_v
    if o_weight is not None and o_weight.shape[-1] != heads * dv:
        raise ValueError(
            f"Expected an output-projection weight of shape (hidden, {heads * dv}) for site {site.name}, "
            f"but got {tuple(o_weight.shape)}. Pass nn.Linear.weight (Conv1D weights transposed)."
        )
    return _head_output_stats(site, stats, o_weight)[0]


def head_mean_outputs(site: Any, stats: Any) -> torch.Tensor:
    """Each head's mean exact-attention output over calibration tokens, ``(num_heads, head_dim_v)``.

    What a pruned head is replaced by (``fill="mean"``); zeros when ``stats`` holds no samples.
    """
    return _head_output_stats(site, stats, None)[1]


def _head_output_stats(site: Any, stats: Any, o_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head importance as in :func:`head_importance_from_stats`, per-head mean output)."""
    heads, dv, n_rep = site.num_heads, site.head_dim_v, max(site.gqa_groups, 1)
    w = None if o_weight is None else o_weight.detach().float().cpu()
    scores = torch.zeros(heads)
    sums = torch.zeros(heads, dv, dtype=torch.float64)
    tokens = 0
    count = 0
    for q, k, v, mask in stats.samples():
        for h in range(heads):
            kv = h // n_rep
            head_mask = (
                mask[:, h : h + 1] if mask is not None and mask.dim() == 4 and mask.shape[1] > 1 else mask
            )
            out = attention_reference(
                q[:, h : h + 1].float(),
                k[:, kv : kv + 1].float(),
                v[:, kv : kv + 1].float(),
                head_mask,
                scale=stats.scale,
                causal=stats.causal,
                window=stats.window,
            )
            sums[h] += out.double().sum(dim=(0, 1, 2)).cpu()
            out = out[0, 0]
            if w is not None:
                out = out @ w[:, h * dv : (h + 1) * dv].T
            scores[h] += out.norm(dim=-1).mean()
        tokens += q.shape[0] * q.shape[2]
        count += 1
    return scores / max(count, 1), (sums / max(tokens, 1)).float()
