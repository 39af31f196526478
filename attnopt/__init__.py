"""attnopt: make attention in PyTorch models fast within an accuracy budget.

    model = attnopt.optimize(model, budget="2x", calib=batches)   # same model object, faster
    torch.compile(model, backend="attnopt")                       # as a torch.compile backend
    sites = attnopt.find_sites(model, input_ids=ids)              # what attention the model has
    attnopt.plan(model, budget="2x", calib=batches).save("plan/") # offline plan, re-applied later
    model = attnopt.apply(model, attnopt.load_plan("plan/"))
"""

from attnopt import codegen as _codegen  # noqa: F401  (registers the attnopt::* operators)
from attnopt._version import __version__
from attnopt.api import apply, backend, find_sites, installed_plan, load_plan, optimize, plan
from attnopt.cost_model.budget import Budget, parse_budget
from attnopt.patterns.site import AttentionSite
from attnopt.rewriter.capture import CaptureError
from attnopt.rewriter.export import ExportCheckError, export, export_mlir
from attnopt.rewriter.rewrite import RewriteError
from attnopt.rewriter.verify import PlanMismatchError

__all__ = [
    "AttentionSite",
    "Budget",
    "CaptureError",
    "ExportCheckError",
    "PlanMismatchError",
    "RewriteError",
    "apply",
    "backend",
    "export",
    "export_mlir",
    "find_sites",
    "installed_plan",
    "load_plan",
    "optimize",
    "parse_budget",
    "plan",
    "__version__",
]
