"""attnopt.cost_model: budgets, device profiles, latency and error of candidates, the planner, plans.

The cost model is a pure function of (site, candidate, device profile); the planner sees
candidates only through their (latency, error) numbers.
"""

from attnopt.cost_model.budget import (
    DEFAULT_MAX_ERROR,
    DEFAULT_MAX_ERRORS,
    METRICS,
    SCOPES,
    Budget,
    parse_budget,
)
from attnopt.cost_model.device import SEED_PROFILES, DeviceProfile, get_profile
from attnopt.cost_model.error import annotate_errors, measure_candidate_error
from attnopt.cost_model.latency import measure_latency, predict_latency, site_shape
from attnopt.cost_model.plan import PLAN_SCHEMA_VERSION, Plan, PlanEntry, fingerprint, load_plan
from attnopt.cost_model.planner import Assignment, Option, pareto_front, solve_assignment
from attnopt.cost_model.planning import build_options, make_plan
from attnopt.cost_model.profiling import profile_device
from attnopt.cost_model.synthetic import make_site, make_stats

__all__ = [
    "Assignment",
    "Budget",
    "DEFAULT_MAX_ERROR",
    "DEFAULT_MAX_ERRORS",
    "DeviceProfile",
    "METRICS",
    "Option",
    "PLAN_SCHEMA_VERSION",
    "Plan",
    "PlanEntry",
    "SCOPES",
    "SEED_PROFILES",
    "annotate_errors",
    "build_options",
    "fingerprint",
    "get_profile",
    "load_plan",
    "make_plan",
    "make_site",
    "make_stats",
    "measure_candidate_error",
    "measure_latency",
    "pareto_front",
    "parse_budget",
    "predict_latency",
    "profile_device",
    "site_shape",
    "solve_assignment",
]
