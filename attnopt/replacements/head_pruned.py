"""Head pruning: rank a site's heads by importance and cut the weakest out of its weights.

Unlike the other families this one is a weight rewrite, not a new operator: the pruned heads'
rows of the q/k/v projections and columns of the output projection are removed, so the
projections shrink with the attention (a real FLOP and parameter cut, not a mask), and the site
then runs the ``exact`` operator with fewer heads. Its exact semantics, written by
:meth:`HeadPrunedFamily.reference`, is exact attention whose pruned heads output a constant:
zero (``fill="zero"``, the default), or their mean output on the calibration data (``"mean"``).
The model computes exactly that once the output projection no longer reads those heads (and,
for the mean, its bias holds ``W_o[:, pruned] @ mean``). The mean is the least-squares
replacement for one head, but planning did better with zeros; see :attr:`HeadPrunedFamily.fill`.

Importance comes from one of two measures:

* ``"gradient"`` — Michel et al., "Are Sixteen Heads Really Better than One?" (2019): the
  expected ``|dL/dg_h|`` of a per-head gate ``g_h = 1`` on the head's slice of the output
  projection's input (:func:`head_importance_from_gradients`), when a loss is available;
* ``"output_norm"`` — the head's contribution to the site's output, ``||o_h W_o[:, h]^T||``,
  from calibration q/k/v (:func:`head_importance_from_stats`), when it is not.

GQA sites are pruned so ``repeat_kv`` stays uniform: every kept key/value group keeps the same
number of query heads, which covers both dropping whole groups and pruning inside every group.
The weight surgery is :func:`prune_heads`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import sympy
import torch
from torch import nn

from attnopt.replacements.base import SYMBOLS, Candidate, CostFormula, Family, FamilyConfig, register_family
from attnopt.replacements.exact import attention_reference, dense_cost

__all__ = [
    "HeadPrunedConfig",
    "HeadPrunedFamily",
    "KEEP_FRACTIONS",
    "apply_head_pruning",
    "head_importance_from_gradients",
    "head_importance_from_stats",
    "head_mean_outputs",
    "kept_groups",
    "projection_weight",
    "prune_heads",
    "pruned_output",
]

log = logging.getLogger(__name__)

#: Shares of query heads a candidate keeps (rounded to whole heads or whole groups).
KEEP_FRACTIONS = (0.875, 0.75, 0.5)


@dataclass(frozen=True)
class HeadPrunedConfig(FamilyConfig):
    """Which heads a pruned site keeps.

    Attributes:
        keep: kept query-head indices, ascending (original numbering).
        kv_keep: kept key/value-head indices, ascending.
        importance: the measure that ranked the heads (``"gradient"`` or ``"output_norm"``).
        fill: what the pruned heads output: ``"mean"``, their calibration mean (the candidate's
            second tensor, ``(num_heads, head_dim_v)``), or ``"zero"``.
    """

    family: ClassVar[str] = "head_pruned"
    keep: tuple[int, ...] = ()
    kv_keep: tuple[int, ...] = ()
    importance: str = "output_norm"
    fill: str = "zero"


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


# --- weight surgery -----------------------------------------------------------------------

#: Attributes of an attention module that hold its query-head count, its kv-head count, its
#: query heads per kv head, and its total query width (``heads * head_dim``). Only those that
#: exist and still hold the pre-pruning value are updated; the shared ``config`` never is.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
_GROUP_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep")
_WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")


def pruned_output(exact: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``exact`` ``(B, H, N, Dv)`` with every head outside ``keep`` set to its ``fill`` row
    (``(H, Dv)``; None: zero): what the model computes once those heads are pruned."""
    alive = torch.zeros(exact.shape[1], dtype=torch.bool, device=exact.device)
    alive[keep.to(exact.device).long()] = True
    out = exact * alive.view(1, -1, 1, 1).to(exact.dtype)
    if fill is not None:
        out = out + (fill.to(device=exact.device, dtype=exact.dtype) * (~alive)[:, None])[None, :, None, :]
    return out


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


def apply_head_pruning(model: nn.Module, site: Any, entry: Any) -> None:
    """Prune ``site`` as a plan entry (or a candidate) of the ``head_pruned`` family says.

    ``entry.config`` is a :class:`HeadPrunedConfig` or its ``to_json()`` dict. A site whose output
    projection already reads exactly the kept heads is taken as pruned before and left alone, so
    applying the same plan twice is harmless.
    """
    config = (
        entry.config
        if isinstance(entry.config, HeadPrunedConfig)
        else HeadPrunedConfig.from_json(entry.config)
    )
    o_proj = model.get_submodule(site.projections["o"]) if "o" in site.projections else None
    if o_proj is not None and len(config.keep) < site.num_heads:
        if _features(o_proj, "in") == len(config.keep) * site.head_dim_v:
            log.debug("head_pruned: site %s is already pruned to %d heads", site.name, len(config.keep))
            return
    fill = entry.params[1] if config.fill == "mean" and len(entry.params) > 1 else None
    prune_heads(model, site, config.keep, fill)


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


class HeadPrunedFamily(Family):
    """Keep the most important 87.5/75/50% of a site's heads; prune the rest from its weights.

    Importance measured with a model (gradients, or output norms with the real ``W_o``) is handed
    in with :meth:`set_importance` before :meth:`candidates`; without it the family falls back to
    ``||o_h||`` from the calibration samples alone.
    """

    name = "head_pruned"
    config_type = HeadPrunedConfig

    def __init__(self, fill: str = "zero") -> None:
        self._importance: dict[str, tuple[torch.Tensor, str]] = {}
        self.fill = fill

    @property
    def fill(self) -> str:
        """What the pruned heads of new candidates output: ``"zero"`` (default) or ``"mean"``.

        Set it with ``get_family("head_pruned").fill = "mean"``. The mean is the better
        replacement for one head: on MiniLM, mean-filled pruning of layer 0 holds embedding
        cosine 0.997 where zeroing heads does not (1.03-1.04x attention at N=256/512,
        ``benchmarks/results/planning-mean-fill.md``). But on codelm, cold "2x" runs met the
        target in 2 of 3 with mean-filled candidates (1.98-2.11x, same file) and in 4 of 4 with
        zero-filled ones (2.00-2.28x, ``planning.md`` and ``planning-repeats-2x.md``); over all
        runs made while choosing, 7 of 12 against 7 of 7. The mean made layer 0's pruning look
        cheaper on the calibration call than it proved on held-out text, so plans failed the
        check and were tightened.
        """
        return self._fill

    @fill.setter
    def fill(self, value: str) -> None:
        if value not in ("zero", "mean"):
            raise ValueError(f"Expected fill 'zero' or 'mean' for head pruning, but got {value!r}.")
        self._fill = value

    def set_importance(self, site_name: str, scores: torch.Tensor, method: str) -> None:
        """Record the importance of ``site_name``'s heads (higher = more important)."""
        self._importance[site_name] = (torch.as_tensor(scores, dtype=torch.float32).flatten(), method)

    def unsupported_reason(self, site: Any) -> str | None:
        reason = super().unsupported_reason(site)
        if reason:
            return reason
        reason = _missing_projections(site)
        if reason:
            return reason
        if site.num_heads < 2:
            return f"site {site.name} has a single query head, which cannot be pruned"
        if site.mask == "bias":
            return f"site {site.name} adds a per-head bias the model computes from its head count"
        return None

    def candidates(self, site: Any, stats: Any) -> list[Candidate]:
        reason = self.unsupported_reason(site)
        if reason:
            log.debug("head_pruned: no candidates: %s", reason)
            return []
        if not stats.q:
            log.debug("head_pruned: site %s has no calibration samples to rank heads or fill them", site.name)
            return []
        scores, method = self._importance.get(site.name, (None, "output_norm"))
        from_stats, means = _head_output_stats(site, stats, None)
        if scores is None:
            scores = from_stats
        if scores.numel() != site.num_heads:
            raise ValueError(
                f"Expected {site.num_heads} importance scores for site {site.name}, but got {scores.numel()}. "
                "Pass one score per query head to set_importance."
            )
        out = []
        for keep in _keep_sets(scores, site):
            kv_keep, _ = kept_groups(site, keep)
            config = HeadPrunedConfig(keep=keep, kv_keep=kv_keep, importance=method, fill=self.fill)
            note = (
                f"keeps {len(keep)}/{site.num_heads} heads ({len(kv_keep)}/{site.num_kv_heads} kv); "
                f"q/k/v/o projections shrink to {len(keep) / site.num_heads:.0%}; pruned heads output "
                "their calibration mean"
            )
            params = [torch.tensor(keep, dtype=torch.int64)]
            if self.fill == "mean":
                fill = means.clone()
                fill[list(keep)] = 0.0
                params.append(fill)
            out.append(Candidate(site.name, self.name, config, params, self.cost(site, config), notes=note))
        return out

    def reference(self, q, k, v, candidate, *, scale, causal, attn_mask=None, window=None):  # noqa: ANN001
        """Exact attention with the pruned heads' outputs replaced by their fill."""
        out = attention_reference(q, k, v, attn_mask, scale=scale, causal=causal, window=window)
        return self.from_exact(candidate, out)

    def from_exact(self, candidate: Candidate, exact: torch.Tensor) -> torch.Tensor:
        """``exact`` ``(B, H, N, Dv)`` with the pruned heads' outputs replaced by their fill."""
        keep = candidate.params[0] if candidate.params else torch.tensor(candidate.config.keep)
        return pruned_output(exact, keep, candidate.params[1] if len(candidate.params) > 1 else None)

    def cost(self, site: Any, config: FamilyConfig) -> CostFormula:
        """Dense attention with ``H`` and ``Hkv`` scaled by the kept shares."""
        s = SYMBOLS
        keep_q = sympy.Rational(len(config.keep), site.num_heads)
        keep_kv = sympy.Rational(len(config.kv_keep), site.num_kv_heads)
        density = sympy.Min(site.window, s["Nk"]) / s["Nk"] if site.window else 1
        base = dense_cost(site, density=density)
        subs = {s["H"]: s["H"] * keep_q, s["Hkv"]: s["Hkv"] * keep_kv}
        return CostFormula(
            flops=base.flops.subs(subs), bytes=base.bytes.subs(subs), scores=base.scores.subs(subs)
        )


def _keep_sets(scores: torch.Tensor, site: Any) -> list[tuple[int, ...]]:
    """Kept-head sets for every fraction: top heads (MHA), or per-group / whole-group (GQA)."""
    heads, n_rep, groups = site.num_heads, max(site.gqa_groups, 1), site.num_kv_heads
    order = sorted(range(heads), key=lambda h: (-float(scores[h]), h))
    rank = {h: r for r, h in enumerate(order)}
    found: list[tuple[int, ...]] = []
    for frac in KEEP_FRACTIONS:
        options = []
        if n_rep == 1:
            options.append(order[: max(1, round(frac * heads))])
        else:
            per_group = round(frac * n_rep)
            if 1 <= per_group < n_rep:
                options.append(
                    [
                        h
                        for g in range(groups)
                        for h in sorted(range(g * n_rep, (g + 1) * n_rep), key=rank.get)[:per_group]
                    ]
                )
            whole = round(frac * groups)
            if 1 <= whole < groups:
                mass = [float(scores[g * n_rep : (g + 1) * n_rep].sum()) for g in range(groups)]
                best = sorted(range(groups), key=lambda g: (-mass[g], g))[:whole]
                options.append([h for g in best for h in range(g * n_rep, (g + 1) * n_rep)])
        for option in options:
            keep = tuple(sorted(option))
            if len(keep) < heads and keep not in found:
                found.append(keep)
    return found


register_family(HeadPrunedFamily())
