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
from dataclasses import dataclass
from typing import Any, ClassVar

import sympy
import torch
from torch import nn

from attnopt.replacements.base import SYMBOLS, Candidate, CostFormula, Family, FamilyConfig, register_family
from attnopt.replacements.exact import attention_reference, dense_cost
from attnopt.replacements.head_importance import (  # re-exported: part of this family's API
    _head_output_stats,
    head_importance_from_gradients,
    head_importance_from_stats,
    head_mean_outputs,
)
from attnopt.replacements.head_surgery import (  # re-exported: part of this family's API
    _features,
    _missing_projections,
    kept_groups,
    projection_weight,
    prune_heads,
)

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


def pruned_output(exact: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``exact`` ``(B, H, N, Dv)`` with every head outside ``keep`` set to its ``fill`` row
    (``(H, Dv)``; None: zero): what the model computes once those heads are pruned."""
    alive = torch.zeros(exact.shape[1], dtype=torch.bool, device=exact.device)
    alive[keep.to(exact.device).long()] = True
    out = exact * alive.view(1, -1, 1, 1).to(exact.dtype)
    if fill is not None:
        out = out + (fill.to(device=exact.device, dtype=exact.dtype) * (~alive)[:, None])[None, :, None, :]
    return out


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


class HeadPrunedFamily(Family):
    """Keep the most important 87.5/75/50% of a site's heads; prune the rest from its weights.

    Importance measured with a model (gradients, or output norms with the real ``W_o``) is handed
    in with :meth:`set_importance` before :meth:`candidates`; without it the family falls back to
    ``||o_h||`` from the calibration samples alone.
    """

    name = "head_pruned"
    config_type = HeadPrunedConfig
    rewrites_weights = True

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

    def apply_to_model(self, model: nn.Module, site: Any, entry: Any) -> None:
        """Slice the pruned heads out of the site's projections (see :func:`apply_head_pruning`)."""
        apply_head_pruning(model, site, entry)

    def applied_inputs(self, candidate, q, k, v):  # noqa: ANN001
        """The first ``len(keep)`` query heads and as many kv heads as the kept groups need.

        Which heads are kept does not change the time, only how many.
        """
        kept = getattr(candidate.config, "keep", ())
        keep = len(kept) if kept else q.shape[1]
        groups = max(q.shape[1] // max(k.shape[1], 1), 1)
        kv_keep = getattr(candidate.config, "kv_keep", ())
        keep_kv = len(kv_keep) if kv_keep else max(keep // groups, 1)
        return q[:, :keep], k[:, :keep_kv], v[:, :keep_kv]

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
