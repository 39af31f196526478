"""The optimisation pipeline: ``optimize()`` and ``plan()`` as named, timed steps.

    capture → find → calibrate → candidates → cost/plan → validate (tighten) → rewrite

* :mod:`~attnopt.pipeline.run`: the run itself (:func:`run_plan`, :func:`run_optimize`);
* :mod:`~attnopt.pipeline.request`: what the user asked for, validated once (:class:`PlanRequest`);
* :mod:`~attnopt.pipeline.candidates`: ``exclude=``, ``families=`` and each family's candidates;
* :mod:`~attnopt.pipeline.metrics`: how a model call is judged (the budget's metrics);
* :mod:`~attnopt.pipeline.validation`: the end-to-end check, tightening and widening.

Applying a plan to a model (``install_plan``, ``plan_choices``) is the rewriter's job
(:mod:`attnopt.rewriter.apply`); it is re-exported here, where earlier versions had it.
"""

from attnopt.pipeline.candidates import Exclude, build_candidates, resolve_exclude
from attnopt.pipeline.metrics import default_metric, output_error
from attnopt.pipeline.request import PlanRequest
from attnopt.pipeline.run import PlanRun, run_optimize, run_plan, warn_no_sites
from attnopt.rewriter.apply import install_choices, install_plan, plan_choices

__all__ = [
    "Exclude",
    "PlanRequest",
    "PlanRun",
    "build_candidates",
    "default_metric",
    "install_choices",
    "install_plan",
    "output_error",
    "plan_choices",
    "resolve_exclude",
    "run_optimize",
    "run_plan",
    "warn_no_sites",
]
