"""The weight surgery of head pruning: slice the pruned heads out of a site's projections.

The q/k/v projections lose the pruned heads' output rows, the output projection their input
columns (and, for a mean fill, gains their constant contribution in its bias). GQA sites keep
``repeat_kv`` uniform: every kept key/value group keeps the same number of query heads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["kept_groups", "projection_weight", "prune_heads"]

log = logging.getLogger("attnopt.replacements.head_pruned")

#: Attributes of an attention module that hold its query-head count, its kv-head count, its
#: query heads per kv head, and its total query width (``heads * head_dim``). Only those that
#: exist and still hold the pre-pruning value are updated; the shared ``config`` never is.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
_GROUP_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep")
_WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")


def kept_groups(site: Any, keep_q_heads: Iterable[int]) -> tuple[tuple[int, ...], int]:
    """The kv heads that stay and the new query heads per kv head, for a kept query-head set.

    Raises:
        ValueError: indices out of range, nothing kept, or kept kv groups with different numbers
            of query heads (``repeat_kv`` needs a uniform group size).
    """
    keep = sorted({int(h) for h in keep_q_heads})
    if not keep or keep[0] < 0 or keep[-1] >= site.num_heads:
        raise ValueError(
            f"Expected kept query heads in [0, {site.num_heads}) for site {site.name}, but got {keep}. "
            "Keep at least one valid head index."
        )
    n_rep = max(site.gqa_groups, 1)
    counts: dict[int, int] = {}
    for h in keep:
        counts[h // n_rep] = counts.get(h // n_rep, 0) + 1
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"Expected the same number of kept query heads in every kept kv group of site {site.name} "
            f"(so repeat_kv stays uniform), but got per-group counts {counts}. Keep whole groups or the "
            "same number of heads in each group."
        )
    return tuple(sorted(counts)), next(iter(counts.values()))


def projection_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight in ``nn.Linear`` layout ``(out, in)`` (``Conv1D`` weights transposed)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def prune_heads(
    model: nn.Module, site: Any, keep_q_heads: Iterable[int], fill: torch.Tensor | None = None
) -> None:
    """Cut every query head not in ``keep_q_heads`` out of the site's projection weights.

    Slices the q/k/v projections' output rows (or a packed ``qkv`` projection laid out
    ``[q | k | v]``) and the output projection's input columns, and updates the head-count
    attributes the owning module's forward reads (``num_heads``, ``num_key_value_groups``,
    ``all_head_size``, ... — only those that exist and still hold the old value). GQA: the kv
    heads with no kept query head are removed too; every kept group must keep the same number of
    query heads. Afterwards the model computes what it computed with those heads' slices of the
    output-projection input set to zero, or, given ``fill`` (``(num_heads, head_dim_v)``), set to
    their rows of it: ``W_o[:, pruned] @ fill[pruned]`` is added to the output projection's bias
    (created if it has none). ``site`` still describes the model before pruning.

    Raises:
        ValueError: the site shows no projections, the kept set is invalid, or a projection's
            width does not match the site's heads (checked before anything is changed).
        TypeError: a projection is neither ``nn.Linear`` nor a ``Conv1D``.
    """
    reason = _missing_projections(site)
    if reason:
        raise ValueError(f"Expected q/k/v/o projections for pruning, but {reason}. Prune another site.")
    keep = sorted({int(h) for h in keep_q_heads})
    kv_keep, n_rep_new = kept_groups(site, keep)
    d, dv, hq, hkv = site.head_dim, site.head_dim_v, site.num_heads, site.num_kv_heads
    rows = {
        "q": _head_slices(keep, d),
        "k": _head_slices(kv_keep, d),
        "v": _head_slices(kv_keep, dv),
    }
    width = {"q": hq * d, "k": hkv * d, "v": hkv * dv}
    out_cuts: list[tuple[nn.Module, torch.Tensor, int]] = []
    if "qkv" in site.projections:
        packed = torch.cat([rows["q"], rows["k"] + width["q"], rows["v"] + width["q"] + width["k"]])
        out_cuts.append((model.get_submodule(site.projections["qkv"]), packed, sum(width.values())))
    else:
        out_cuts += [(model.get_submodule(site.projections[n]), rows[n], width[n]) for n in ("q", "k", "v")]
    o_proj = model.get_submodule(site.projections["o"])
    for module, _, expected in out_cuts:
        _check_width(site, module, expected, "out")
    _check_width(site, o_proj, hq * dv, "in")
    if fill is not None:
        _fold_fill_into_bias(site, o_proj, keep, fill)
    for module, idx, _ in out_cuts:
        _slice_features(module, idx, "out")
    _slice_features(o_proj, _head_slices(keep, dv), "in")
    new = {_HEAD_ATTRS: (hq, len(keep)), _KV_ATTRS: (hkv, len(kv_keep))}
    new[_GROUP_ATTRS] = (max(site.gqa_groups, 1), n_rep_new)
    new[_WIDTH_ATTRS] = (hq * d, len(keep) * d)
    owner = model.get_submodule(site.module_path)
    for names, (old, value) in new.items():
        for name in names:
            current = getattr(owner, name, None)
            if isinstance(current, int) and not isinstance(current, bool) and current == old:
                setattr(owner, name, value)


def _fold_fill_into_bias(site: Any, o_proj: nn.Module, keep: list[int], fill: torch.Tensor) -> None:
    """Add what the pruned heads' constant outputs contribute through ``o_proj`` to its bias."""
    heads, dv = site.num_heads, site.head_dim_v
    if tuple(fill.shape) != (heads, dv):
        raise ValueError(
            f"Expected a fill of shape ({heads}, {dv}) for site {site.name}, but got {tuple(fill.shape)}. "
            "Pass one row per query head."
        )
    pruned = [h for h in range(heads) if h not in set(keep)]
    if not pruned:
        return
    weight = projection_weight(o_proj).detach()  # (out, heads * dv)
    cols = _head_slices(pruned, dv).to(weight.device)
    rows = fill[pruned].reshape(-1).to(device=weight.device, dtype=torch.float32)
    shift = (weight.index_select(1, cols).float() @ rows).to(weight.dtype)
    bias = getattr(o_proj, "bias", None)
    if bias is None:
        o_proj.bias = nn.Parameter(shift.clone(), requires_grad=weight.requires_grad)
    else:
        o_proj.bias = nn.Parameter(bias.detach() + shift, requires_grad=bias.requires_grad)


def _missing_projections(site: Any) -> str | None:
    """One sentence when the site does not show the projections pruning rewrites."""
    proj = site.projections
    if "o" in proj and ({"q", "k", "v"} <= proj.keys() or "qkv" in proj):
        return None
    return (
        f"site {site.name} shows no q/k/v and output projections (got {sorted(proj)}), "
        "so there are no weights to prune heads from"
    )


def _head_slices(heads: Iterable[int], width: int) -> torch.Tensor:
    """Feature indices of the given heads when each head owns ``width`` consecutive features."""
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family): a linear layer with weight stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _features(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    if _is_conv1d(module):
        return module.nf if side == "out" else module.nx
    raise TypeError(
        f"Expected an nn.Linear or Conv1D projection, but got {type(module).__name__}. "
        "Head pruning only rewrites those projection types."
    )


def _check_width(site: Any, module: nn.Module, expected: int, side: str) -> None:
    got = _features(module, side)
    if got != expected:
        raise ValueError(
            f"Expected a projection of site {site.name} with {expected} {side}put features, but got {got}. "
            "Check the site's head counts and head dims."
        )


def _slice_features(module: nn.Module, idx: torch.Tensor, side: str) -> None:
    """Keep only features ``idx`` of a projection's outputs (``side="out"``) or inputs."""
    weight = module.weight
    idx = idx.to(weight.device)
    # Linear weights are (out, in); Conv1D weights (in, out).
    dim = (0 if side == "out" else 1) if isinstance(module, nn.Linear) else (1 if side == "out" else 0)
    module.weight = nn.Parameter(weight.detach().index_select(dim, idx).clone(), weight.requires_grad)
    bias = getattr(module, "bias", None)
    if side == "out" and bias is not None:
        module.bias = nn.Parameter(bias.detach().index_select(0, idx).clone(), bias.requires_grad)
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if side == "out" else "in_features", idx.numel())
    else:
        setattr(module, "nf" if side == "out" else "nx", idx.numel())
