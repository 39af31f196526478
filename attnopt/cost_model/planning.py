"""From sites and their candidates to a :class:`~attnopt.cost_model.plan.Plan`, step by named step.

A :class:`PlanProblem` is one planning problem, frozen: the sites, their candidates, the budget
(parsed once), the device profile (resolved once) and how candidates are scored. Its
:meth:`~PlanProblem.solve` is the cost model's pipeline: errors → latencies → solve → Pareto
front → plan, each step's wall time recorded in ``Plan.timings``; validation re-solves the same
problem under tighter or wider bounds by passing just those. :func:`make_plan` is the one-call
form. Candidates are scored, never inspected: the solver (:mod:`~attnopt.cost_model.planner`)
sees only :class:`~attnopt.cost_model.planner.Option` numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnopt._steps import timed
from attnopt.cost_model.budget import Budget, parse_budget
from attnopt.cost_model.device import DeviceProfile, get_profile, versions
from attnopt.cost_model.error import measure_candidate_error
from attnopt.cost_model.latency import measure_latency, measure_relative, predict_latency, site_shape
from attnopt.cost_model.plan import Plan, PlanEntry, fingerprint
from attnopt.cost_model.planner import Assignment, Option, pareto_front, solve_assignment
from attnopt.replacements.base import Candidate

if TYPE_CHECKING:  # pragma: no cover
    from attnopt.patterns.site import AttentionSite
    from attnopt.patterns.site_stats import SiteStats

__all__ = ["PlanProblem", "build_options", "exact_plan", "make_plan"]

log = logging.getLogger(__name__)


def _exact_candidate(site: AttentionSite) -> Candidate:
    from attnopt.replacements.exact import ExactFamily

    return ExactFamily().candidates(site, None)[0]


def _metric_error(budget: Budget, rel: float, cos: float | None) -> float:
    if budget.concrete_metric == "cosine":
        return 1.0 - cos if cos is not None else math.inf
    return rel  # "perplexity" is validated end to end; per site the relative error is its proxy


def _timing_inputs(site: AttentionSite, stats: SiteStats | None):
    if stats is not None and stats.q:
        return stats.q[0], stats.k[0], stats.v[0], stats.attn_mask[0]
    shape_q = (site.batch, site.num_heads, site.q_len, site.head_dim)
    shape_k = (site.batch, site.num_kv_heads, site.kv_len, site.head_dim)
    shape_v = (site.batch, site.num_kv_heads, site.kv_len, site.head_dim_v)
    return torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_v), None


def build_options(
    sites: Mapping[str, AttentionSite],
    candidates: Mapping[str, list[Candidate]],
    budget: Budget,
    profile: DeviceProfile,
    *,
    stats: Mapping[str, SiteStats] | None = None,
    measure: bool | str = False,
    timings: dict[str, float] | None = None,
    end_to_end: bool = False,
) -> dict[str, list[Option]]:
    """Score every candidate: predicted (and measured) latency, then error on calibration samples.

    Measured latency is exact attention's median time at the site times the candidate's median
    ratio to exact in interleaved pairs (:func:`measure_relative`), so a site's candidates are
    ranked on one footing however the machine's load drifts. A candidate no faster than exact
    (measured, else predicted) can never be chosen — exact has no error — so its error is not
    measured (it is infinite, with a note); on a CPU that skips the slow emulated kernels' error
    runs. A candidate whose error cannot be measured (no stats and no pre-filled error, or a
    failing kernel) also gets an infinite error; exact is added where missing.

    With ``end_to_end=True`` an option's error is its candidate's ``end_to_end`` error (the
    model's metric with only that site changed; infinite where it was not measured) instead of
    the site-level error, which is still measured and kept on the candidate for reports.
    """
    timings = timings if timings is not None else {}
    options: dict[str, list[Option]] = {}
    for name, site in sites.items():
        cands = list(candidates.get(name, [])) if site.rewritable else []
        if not any(c.family == "exact" for c in cands):
            cands.insert(0, _exact_candidate(site))
        exact = next(c for c in cands if c.family == "exact")
        st = (stats or {}).get(name)
        with timed(timings, "latency"):
            inputs = _timing_inputs(site, st) if measure else None
            exact_measured = measure_latency(site, exact, *inputs) if inputs is not None else None
            exact_seconds = (
                exact_measured if exact_measured is not None else predict_latency(site, exact, profile)
            )
        site_opts = []
        for cand in cands:
            with timed(timings, "latency"):
                predicted = predict_latency(site, cand, profile)
                measured = exact_measured if cand is exact else None
                if cand is not exact and inputs is not None:
                    try:
                        quick = dict(repeats=3, give_up_above=1.25) if measure == "auto" else dict(give_up_above=None)
                        ratio = measure_relative(site, cand, exact, *inputs, **quick)
                        measured = exact_measured * ratio
                    except NotImplementedError as e:
                        log.info("attnopt: not timing %s at %s: %s", cand.label, name, e)
                seconds = measured if measured is not None else predicted
            with timed(timings, "errors"):
                rel, cos = (0.0, 1.0) if cand is exact else (cand.error, None)
                if cand is not exact and seconds >= exact_seconds:
                    rel, cos = math.inf, None
                    kind = "measured" if measured is not None else "predicted"
                    cand.notes = (cand.notes + f"; not scored: {kind} no faster than exact here").lstrip("; ")
                elif cand is not exact and st is not None and st.q:
                    try:
                        rel, cos = measure_candidate_error(site, cand, st)
                    except Exception as e:  # noqa: BLE001  (a broken candidate is skipped, with its reason)
                        log.warning("attnopt: %s at %s failed on calibration data: %s", cand.label, name, e)
                        rel, cos = math.inf, None
                        cand.notes = (cand.notes + f"; failed: {e}").lstrip("; ")
                rel = math.inf if rel is None else rel
                cand.error = rel
            error = _metric_error(budget, rel, cos)
            if end_to_end and cand is not exact:
                error = cand.end_to_end if cand.end_to_end is not None and math.isfinite(error) else math.inf
            site_opts.append(
                Option(name, cand, seconds, error, predicted=predicted, measured=measured, cosine=cos)
            )
        options[name] = site_opts
    return options


#: Context lengths tried for where a variant starts to pay off (see :func:`payoff_length`).
PAYOFF_LENGTHS = tuple(2**i for i in range(6, 18))


def payoff_length(site: AttentionSite, candidate: Candidate, exact: Candidate, profile: DeviceProfile) -> int:
    """The shortest context (keys) from which ``candidate`` is predicted faster than exact at ``site``.

    Walks :data:`PAYOFF_LENGTHS` below the site's own length, longest first, scaling the query
    length with the keys (prefill) and keeping heads and head dims; returns the last length where
    the variant still wins, so a plan made at 2048 tokens runs exact attention on a 100-token
    prompt instead of a variant that costs more there. 0 when the variant wins at every length
    tried; head pruning (the weights themselves are sliced) always returns 0.
    """
    if candidate.family in ("exact", "head_pruned"):
        return 0
    ratio = site.q_len / max(site.kv_len, 1)
    shortest = 0
    for n in sorted((n for n in PAYOFF_LENGTHS if n < site.kv_len), reverse=True):
        shape = site_shape(site, Nq=max(1, round(n * ratio)), Nk=n)
        if predict_latency(site, candidate, profile, shape) >= predict_latency(site, exact, profile, shape):
            return shortest or site.kv_len
        shortest = n
    return 0


def _entry(site: AttentionSite, opt: Option, exact: Option, min_len: int = 0) -> PlanEntry:
    from attnopt.replacements.base import get_family

    decodes = opt.family != "exact" and get_family(opt.family).decode_form(opt.candidate.config)
    return PlanEntry(
        site=site.name,
        family=opt.family,
        config=opt.candidate.config.to_json(),
        params=list(opt.candidate.params),
        predicted_s=opt.predicted,
        measured_s=opt.measured,
        exact_predicted_s=exact.predicted,
        exact_measured_s=exact.measured,
        error=opt.candidate.error or 0.0,
        cosine=opt.cosine,
        notes=opt.candidate.notes,
        decode="family" if decodes else "exact",
        min_len=min_len,
        end_to_end=None if opt.family == "exact" else opt.candidate.end_to_end,
    )


def _front_points(front: list[Assignment]) -> list[dict[str, float]]:
    return [{"seconds": a.seconds, "error": a.error, "speedup": a.speedup} for a in front]


@dataclass(frozen=True)
class PlanProblem:
    """One planning problem: what :meth:`solve` needs, fixed once, instead of a dozen arguments.

    Attributes:
        sites: site name → site.
        candidates: site name → candidates from the families (exact is added where missing).
        budget: the parsed :class:`Budget`.
        profile: the resolved :class:`DeviceProfile`.
        stats: site name → calibration stats; errors are measured on them (else taken from
            ``Candidate.error``; a candidate with no error is never chosen).
        measure: ``True`` times every candidate on the site's shape (in interleaved pairs with
            exact attention) and plans with measured times; ``"auto"`` does the same with 3 pairs
            instead of 5, and stops timing a candidate after one pair once it is 1.25x slower than
            exact (it cannot be chosen); ``False`` plans with predictions alone.
        other_seconds: non-attention time per forward (for ``scope="model"``).
        model_seconds: measured time of one whole exact forward; with ``scope="model"`` the time
            outside attention is this minus the sites' exact attention time (when
            ``other_seconds`` is not given), so the speedup is of the whole model.
        families, exclude: see :func:`~attnopt.cost_model.planner.solve_assignment`.
        end_to_end: plan on the candidates' measured end-to-end errors (``Candidate.end_to_end``)
            instead of site errors. They are in the budget's own metric, so the tolerance bounds
            both each site's error and, unless ``max_total_error`` says otherwise, their sum (to
            first order, one-site deviations add up through the residual stream).
        max_total_error, site_error_cap: the defaults of :meth:`solve`'s bounds.
    """

    sites: Mapping[str, AttentionSite]
    candidates: Mapping[str, list[Candidate]]
    budget: Budget
    profile: DeviceProfile
    stats: Mapping[str, SiteStats] | None = None
    measure: bool | str = False
    other_seconds: float = 0.0
    model_seconds: float | None = None
    families: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    end_to_end: bool = False
    max_total_error: float | None = None
    site_error_cap: float | None = None

    @classmethod
    def create(
        cls,
        sites: Iterable[AttentionSite] | Mapping[str, AttentionSite],
        candidates: Mapping[str, list[Candidate]],
        budget: str | float | Budget | None,
        *,
        profile: DeviceProfile | str | None = None,
        timings: dict[str, float] | None = None,
        families: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        **fields: Any,
    ) -> PlanProblem:
        """The problem with ``budget`` parsed and ``profile`` resolved (a name, or None = this machine).

        ``timings`` (optional) receives the seconds resolving the profile took, as ``"profile"``.
        """
        site_map = dict(sites) if isinstance(sites, Mapping) else {s.name: s for s in sites}
        with timed(timings if timings is not None else {}, "profile"):
            prof = profile if isinstance(profile, DeviceProfile) else get_profile(profile)
        return cls(
            site_map, candidates, parse_budget(budget), prof,
            families=None if families is None else tuple(families),
            exclude=None if exclude is None else tuple(exclude),
            **fields,
        )  # fmt: skip

    def replace(self, **changes: Any) -> PlanProblem:
        """The same problem with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def solve(
        self,
        *,
        budget: Budget | None = None,
        pin: Mapping[str, str] | None = None,
        max_total_error: float | None = None,
        site_error_cap: float | None = None,
        with_pareto: bool = True,
        timings: dict[str, float] | None = None,
    ) -> Plan:
        """Plan every site; ``budget``, the bounds and ``pin`` override the problem's for this solve.

        Args:
            budget: another speed target for the same problem (validation bisects it).
            pin: site (glob) → family that site must take.
            max_total_error: bound on the summed per-site errors.
            site_error_cap: per-site error bound under a speed target (default
                :data:`~attnopt.cost_model.planner.SITE_ERROR_CAP`).
            with_pareto: also compute the Pareto front (one extra MILP per point).
            timings: step times to start from (the problem's profile resolution).

        Returns:
            The :class:`Plan`; ``plan.explanation`` says why when the speed target is unreachable.
        """
        budget = budget or self.budget
        max_total_error = self.max_total_error if max_total_error is None else max_total_error
        site_error_cap = self.site_error_cap if site_error_cap is None else site_error_cap
        timings = dict(timings or {})
        prof, other_seconds = self.profile, self.other_seconds
        options = build_options(
            self.sites, self.candidates, budget, prof, stats=self.stats, measure=self.measure, timings=timings,
            end_to_end=self.end_to_end,
        )  # fmt: skip
        if self.end_to_end:
            site_error_cap = budget.tolerance if site_error_cap is None else site_error_cap
            max_total_error = budget.tolerance if max_total_error is None else max_total_error
        if budget.scope == "model" and other_seconds == 0.0 and self.model_seconds is not None:
            exact_total = sum(next(o.seconds for o in opts if o.family == "exact") for opts in options.values())
            other_seconds = max(self.model_seconds - exact_total, 0.0)
            log.info("attnopt: scope='model': %.3g s of %.3g s per forward is outside attention", other_seconds,
                     self.model_seconds)
        elif budget.scope == "model" and other_seconds == 0.0:
            log.warning("attnopt: scope='model' without a whole-model time plans attention time only")
        with timed(timings, "solve"):
            best = solve_assignment(
                options, budget, other_seconds=other_seconds, max_total_error=max_total_error,
                families=self.families, exclude=self.exclude, pin=pin, site_error_cap=site_error_cap,
            )  # fmt: skip
        front: list[Assignment] = []
        if with_pareto:
            with timed(timings, "pareto"):
                front = pareto_front(
                    options, max_error=budget.tolerance, other_seconds=other_seconds, families=self.families,
                    exclude=self.exclude, pin=pin,
                )  # fmt: skip
        entries = []
        for name, site in self.sites.items():
            exact = next(o for o in options[name] if o.family == "exact")
            chosen = best.choice.get(name, exact)
            min_len = payoff_length(site, chosen.candidate, exact.candidate, prof) if chosen is not exact else 0
            entries.append(_entry(site, chosen, exact, min_len))
        return Plan(
            entries=entries,
            budget=budget,
            device=prof.name,
            target=prof.target,
            fingerprint=fingerprint(list(self.sites.values())),
            sites=[s.structure() for s in self.sites.values()],
            pareto=_front_points(front),
            explanation=best.explanation,
            feasible=best.feasible,
            totals={
                "exact_s": best.exact_seconds,
                "planned_s": best.seconds,
                "speedup": best.speedup,
                "error": best.error,
            },
            timings=timings,
            versions=versions(),
        )


def make_plan(
    sites: Iterable[AttentionSite] | Mapping[str, AttentionSite],
    candidates: Mapping[str, list[Candidate]],
    budget: str | float | Budget | None,
    *,
    profile: DeviceProfile | str | None = None,
    pin: Mapping[str, str] | None = None,
    with_pareto: bool = True,
    **problem: Any,
) -> Plan:
    """Plan every site under ``budget``: ``PlanProblem.create(...).solve(...)`` in one call.

    Args:
        sites: the model's attention sites (list or name → site).
        candidates: site name → candidates from the families (exact is added where missing).
        budget: anything :func:`~attnopt.cost_model.budget.parse_budget` accepts.
        profile: a :class:`DeviceProfile` or target name for :func:`get_profile` (None = local).
        pin: see :func:`~attnopt.cost_model.planner.solve_assignment`.
        with_pareto: also compute the Pareto front (one extra MILP per point).
        **problem: the other fields of :class:`PlanProblem` (``stats``, ``measure``,
            ``other_seconds``, ``model_seconds``, ``families``, ``exclude``, ``end_to_end``,
            ``max_total_error``, ``site_error_cap``).

    Returns:
        The :class:`Plan`; ``plan.explanation`` says why when the speed target is unreachable.
    """
    timings: dict[str, float] = {}
    plan_problem = PlanProblem.create(sites, candidates, budget, profile=profile, timings=timings, **problem)
    return plan_problem.solve(pin=pin, with_pareto=with_pareto, timings=timings)


def exact_plan(sites: list[AttentionSite], budget: Budget, timings: dict[str, float] | None = None) -> Plan:
    """The plan that runs exact attention at every site (what budget "1x" asks for)."""
    return Plan(
        entries=[PlanEntry(site=s.name, family="exact", config={}) for s in sites],
        budget=budget,
        fingerprint=fingerprint(sites),
        sites=[s.structure() for s in sites],
        totals={"speedup": 1.0, "error": 0.0},
        timings=dict(timings or {}),
        versions=versions(),
    )
