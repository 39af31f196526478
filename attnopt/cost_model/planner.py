"""The solver: choose one candidate per site, as one exact assignment problem over all sites.

(:mod:`~attnopt.cost_model.planning` builds the problem and turns the solution into a plan;
this module only solves it.)

The planner sees candidates only through :class:`Option` records (seconds, error). With
``x[s, j] = 1`` when site ``s`` takes option ``j``:

* every site takes exactly one option: ``sum_j x[s, j] = 1`` (exact is always an option);
* an option whose per-site error exceeds the budget's tolerance is not offered, except exact;
* (a) with a speed target: minimise ``sum error`` subject to ``other + sum seconds <= T``,
  where ``T = (other + exact total) / speedup`` or the absolute latency (and, given
  ``max_total_error``, that sum within it);
* (b) without one: minimise ``sum seconds`` (the per-site tolerance bounds the error), with
  an optional ``max_total_error`` bound on ``sum error``.

The error of an option is what the pipeline gives it: the model's own end-to-end error with
only that option applied (``Candidate.end_to_end``, the default when calibration calls allow),
or else the site's relative L2 error. Either way the sum is a first-order proxy of the whole
plan's deviation (one-site deviations add to first order through residual streams), which is
why the assembled plan is validated end to end afterwards. Ties are broken lexicographically
(least error among the fastest, fastest among the least error) by a second solve. The problem is solved
exactly by ``scipy.optimize.milp`` (HiGHS) with a zero MIP gap and presolve off; HiGHS honours
the latency bound to about 1e-6 relative, so a plan may miss a speed target by that much.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from attnopt.cost_model.budget import Budget
from attnopt.replacements.base import Candidate

__all__ = ["Assignment", "Option", "filter_options", "pareto_front", "solve_assignment"]


@dataclass
class Option:
    """One candidate of one site as the planner sees it.

    Attributes:
        site: site name.
        candidate: the fitted candidate (kept to build the plan, never inspected by the solver).
        seconds: latency per call used for planning (measured if available, else predicted).
        error: per-site error in the budget's metric (relative L2 error by default).
        predicted: predicted seconds; ``measured`` measured seconds or None.
        cosine: cosine similarity to exact attention, when measured.
    """

    site: str
    candidate: Candidate
    seconds: float
    error: float
    predicted: float | None = None
    measured: float | None = None
    cosine: float | None = None

    @property
    def family(self) -> str:
        return self.candidate.family

    @property
    def label(self) -> str:
        return self.candidate.label


@dataclass
class Assignment:
    """A solved plan: the option each site takes and the totals.

    Attributes:
        choice: site name → chosen :class:`Option`.
        seconds: total attention seconds of the choice (plus ``other_seconds``).
        exact_seconds: total with exact everywhere (plus ``other_seconds``).
        error: sum of per-site errors.
        feasible: whether the budget's speed target is met.
        explanation: one sentence when the budget is unreachable (else ``""``).
    """

    choice: dict[str, Option]
    seconds: float
    exact_seconds: float
    error: float
    feasible: bool = True
    explanation: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.exact_seconds / self.seconds if self.seconds > 0 else math.inf


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in (patterns or ()))


def filter_options(
    options: Mapping[str, list[Option]],
    *,
    max_error: float,
    families: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    pin: Mapping[str, str] | None = None,
) -> tuple[dict[str, list[Option]], list[str]]:
    """Options each site may take, and notes saying what was restricted.

    Args:
        options: site → its options; each site must have an ``exact`` option.
        max_error: per-site tolerance; options above it are dropped (exact never is).
        families: family-name wildcards allowed (exact is always allowed); None = all.
        exclude: site-name wildcards kept exact (e.g. ``"model.layers.0.*"``).
        pin: site-name wildcard → family/label wildcard the site must take (e.g.
            ``{"*.layers.1.*": "quantized"}``); a pin is honoured even above the tolerance.

    Raises:
        ValueError: a site without an exact option, or a pin that matches none of a site's options.
    """
    allowed: dict[str, list[Option]] = {}
    notes: list[str] = []
    fams = list(families) if families is not None else None
    for site, opts in options.items():
        exact = [o for o in opts if o.family == "exact"]
        if not exact:
            raise ValueError(
                f"Expected an exact option for every site, but site {site!r} has only "
                f"{sorted({o.family for o in opts})}. Add ExactFamily's candidate."
            )
        pins = [p for p in (pin or {}) if fnmatch.fnmatchcase(site, p)]
        if pins:
            want = pin[pins[0]]
            chosen = [
                o for o in opts if fnmatch.fnmatchcase(o.family, want) or fnmatch.fnmatchcase(o.label, want)
            ]
            if not chosen:
                raise ValueError(
                    f"Expected pin {pins[0]!r} → {want!r} to match an option of site {site!r}, but its options "
                    f"are {[o.label for o in opts]}. Pin one of those families."
                )
            allowed[site] = chosen
            notes.append(f"{site}: pinned to {want}")
            continue
        if _matches(site, exclude):
            allowed[site] = exact[:1]
            notes.append(f"{site}: excluded, kept exact")
            continue
        keep = [
            o
            for o in opts
            if o.family == "exact"
            or (
                (fams is None or _matches(o.family, fams))
                and math.isfinite(o.error)
                and o.error <= max_error
                and math.isfinite(o.seconds)
            )
        ]
        allowed[site] = keep
    return allowed, notes


_ROW_SCALE = 1.0e6


def _solve(
    options: dict[str, list[Option]],
    objective: str,
    *,
    max_seconds: float | None = None,
    max_error: float | None = None,
) -> dict[str, Option] | None:
    """One MILP: minimise ``objective`` ("seconds" or "error") under the two optional bounds."""
    sites = list(options)
    flat = [(s, o) for s in sites for o in options[s]]
    n = len(flat)
    secs = np.array([o.seconds for _, o in flat], dtype=float)
    errs = np.array([o.error for _, o in flat], dtype=float)
    # HiGHS accepts rows violated by up to its MIP feasibility tolerance (1e-6, after its own
    # scaling); rows are pre-scaled to entries up to 1e6 so the slack stays ~1e-6 relative or less.
    scale = max(float(secs.max()), 1e-30) / _ROW_SCALE
    escale = max(float(errs[np.isfinite(errs)].max(initial=0.0)), 1e-30) / _ROW_SCALE
    c = secs / scale / _ROW_SCALE if objective == "seconds" else errs / escale / _ROW_SCALE  # both O(1)
    rows = np.zeros((len(sites), n))
    index = {s: i for i, s in enumerate(sites)}
    for j, (s, _) in enumerate(flat):
        rows[index[s], j] = 1.0
    constraints = [LinearConstraint(rows, 1.0, 1.0)]
    if max_seconds is not None:
        constraints.append(
            LinearConstraint((secs / scale)[None, :], -np.inf, max_seconds / scale * (1 + 1e-12))
        )
    if max_error is not None:
        constraints.append(LinearConstraint((errs / escale)[None, :], -np.inf, (max_error + 1e-12) / escale))
    res = milp(
        c,
        constraints=constraints,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        # presolve off: HiGHS 1.x presolve (scipy 1.17) returned a suboptimal "optimal" point on a
        # 3-site instance found by the brute-force tests; these problems are small without it.
        options={"mip_rel_gap": 0.0, "presolve": False},
    )
    if res.status != 0 or res.x is None:
        return None
    picked = np.round(res.x).astype(int)
    choice: dict[str, Option] = {}
    for j, (s, o) in enumerate(flat):
        if picked[j]:
            choice[s] = o
    return choice if len(choice) == len(sites) else None


def _totals(choice: Mapping[str, Option]) -> tuple[float, float]:
    return sum(o.seconds for o in choice.values()), sum(o.error for o in choice.values())


def _min_seconds(options, max_error=None) -> dict[str, Option] | None:
    first = _solve(options, "seconds", max_error=max_error)
    if first is None:
        return None
    t, _ = _totals(first)
    return _solve(options, "error", max_seconds=t * (1 + 1e-9), max_error=max_error) or first


def _min_error(options, max_seconds) -> dict[str, Option] | None:
    first = _solve(options, "error", max_seconds=max_seconds)
    if first is None:
        return None
    _, e = _totals(first)
    return _solve(options, "seconds", max_seconds=max_seconds, max_error=e + 1e-12) or first


#: With a speed target, per-site errors are only a proxy: the plan is judged end to end on
#: held-out data (and tightened there), so a site may exceed the end-to-end tolerance up to
#: this bound. Beyond it a candidate is considered broken for that site.
SITE_ERROR_CAP = 0.15


def site_error_bound(budget: Budget, cap: float | None = None) -> float:
    """Largest per-site error a candidate may have to be considered under ``budget``.

    Without a speed target (least latency under an error tolerance) the tolerance itself;
    with one (least error under a latency target) ``cap`` (default :data:`SITE_ERROR_CAP`),
    since the summed error is minimised and the end-to-end check decides.
    """
    if budget.has_speed_target:
        return max(budget.tolerance, SITE_ERROR_CAP if cap is None else cap)
    return budget.tolerance


def solve_assignment(
    options: Mapping[str, list[Option]],
    budget: Budget,
    *,
    other_seconds: float = 0.0,
    max_total_error: float | None = None,
    families: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    pin: Mapping[str, str] | None = None,
    site_error_cap: float | None = None,
) -> Assignment:
    """Solve the budget's problem over all sites (see the module docstring).

    Args:
        options: site → options (each with an exact option).
        budget: the parsed budget; ``budget.tolerance`` is the per-site error bound.
        other_seconds: time outside attention, for ``scope="model"`` speedups and latencies.
        max_total_error: optional bound on the sum of per-site errors. Under a speed target, a
            plan that meets the target only above this bound does not meet the budget; the
            fastest plan within it is returned instead (as in problem b).
        families, exclude, pin: restrictions, see :func:`filter_options`.
        site_error_cap: per-site error bound under a speed target (see :func:`site_error_bound`).

    Returns:
        The :class:`Assignment`; when the speed target cannot be met, the fastest plan within
        the tolerance with ``feasible=False`` and a one-sentence ``explanation``.
    """
    allowed, notes = filter_options(
        options, max_error=site_error_bound(budget, site_error_cap), families=families, exclude=exclude, pin=pin
    )
    if not allowed:
        return Assignment({}, other_seconds, other_seconds, 0.0, notes=notes)
    exact_total = other_seconds + sum(
        next(o for o in options[s] if o.family == "exact").seconds for s in allowed
    )
    target = _target_seconds(budget, exact_total)
    choice = None
    if target is not None:
        choice = _min_error(allowed, target - other_seconds)
        if choice is not None and max_total_error is not None and _totals(choice)[1] > max_total_error * (1 + 1e-9):
            choice = None
    feasible = choice is not None or target is None
    if choice is None:
        choice = _min_seconds(allowed, max_total_error)
        if choice is None:  # only max_total_error can make (b) infeasible: fall back to exact
            choice = {s: next(o for o in opts if o.family == "exact") for s, opts in allowed.items()}
            notes.append(f"max_total_error={max_total_error} admits no plan but exact everywhere")
    seconds, error = _totals(choice)
    result = Assignment(choice, other_seconds + seconds, exact_total, error, feasible=feasible, notes=notes)
    if not feasible:
        result.explanation = _explain(budget, result, target, families)
    return result


def _target_seconds(budget: Budget, exact_total: float) -> float | None:
    if budget.latency_ms is not None:
        return budget.latency_ms / 1e3
    if budget.speedup is not None and budget.speedup > 1.0:
        return exact_total / budget.speedup
    return None


def _explain(budget: Budget, best: Assignment, target: float | None, families) -> str:
    fams = "the families allowed" if families is None else f"the families allowed ({', '.join(families)})"
    reach = f"{best.speedup:.2f}x ({best.seconds * 1e3:.3g} ms)"
    tol = f"{budget.concrete_metric}<={budget.tolerance:g}"
    if budget.latency_ms is not None:
        removed = 1.0 - target / best.exact_seconds if best.exact_seconds > 0 else 0.0
        need = f"latency<={budget.latency_ms:g}ms needs {removed:.0%} of the exact {best.exact_seconds * 1e3:.3g} ms removed"
    else:
        need = f"{budget.speedup:g}x needs {1.0 - 1.0 / budget.speedup:.0%} of {budget.scope} time removed"
    return f"{need}; {fams} reach {reach} within {tol}."


def pareto_front(
    options: Mapping[str, list[Option]],
    *,
    max_error: float,
    other_seconds: float = 0.0,
    max_points: int = 64,
    families: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    pin: Mapping[str, str] | None = None,
) -> list[Assignment]:
    """The speed/error Pareto front, from exact (least error) to fastest, by the ε-constraint method.

    Each step solves "least error with total seconds strictly below the last point's", then
    "fastest at that error"; every point is Pareto-optimal. At most ``max_points`` points (a
    front can be exponential in the number of sites; the points returned are still optimal).
    """
    allowed, notes = filter_options(options, max_error=max_error, families=families, exclude=exclude, pin=pin)
    if not allowed:
        return []
    exact_total = other_seconds + sum(
        next(o for o in options[s] if o.family == "exact").seconds for s in allowed
    )
    front: list[Assignment] = []
    choice = _min_error(allowed, None)
    while choice is not None and len(front) < max_points:
        seconds, error = _totals(choice)
        front.append(Assignment(choice, other_seconds + seconds, exact_total, error, notes=list(notes)))
        choice = _next_faster(allowed, seconds)
    return front


def _next_faster(allowed, seconds: float) -> dict[str, Option] | None:
    """Least-error choice strictly faster than ``seconds``, or None when there is none.

    HiGHS scales rows internally and accepts bounds violated by about 1e-6 relative, so a bound
    of ``seconds * (1 - tiny)`` can return the same point again; the step grows until the
    answer is really faster (plans within 0.1% of each other's latency count as one point).
    """
    for step in _FRONT_STEPS:
        choice = _min_error(allowed, seconds * (1 - step))
        if choice is None:
            return None
        if _totals(choice)[0] < seconds:
            return choice
    return None


_FRONT_STEPS = (1e-5, 1e-4, 1e-3)
