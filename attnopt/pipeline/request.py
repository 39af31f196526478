"""What the user asked a planning run for, validated once and then carried as one frozen value.

``optimize()``, ``plan()`` and the deferred first-call planner all reach the run with the same
keyword arguments; :meth:`PlanRequest.create` checks and normalises them (the budget parsed,
the calibration calls normalised, the families checked) so no later step re-reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnopt.calibration.stats import CalibrationConfig
from attnopt.cost_model.budget import Budget, parse_budget
from attnopt.pipeline.candidates import Exclude, validate_families
from attnopt.rewriter.calls import normalise_calib

__all__ = ["PlanRequest"]

Call = tuple[tuple, dict]


@dataclass(frozen=True)
class PlanRequest:
    """One planning run's inputs.

    Attributes:
        budget: the parsed budget (its metric made concrete once the model's output is seen).
        calls: the calibration calls, normalised to ``(args, kwargs)``; the first is captured.
        families: the families to consider (None: all).
        exclude: sites kept exact (a glob, globs, or a predicate on the site).
        target: a device profile name to plan for, or None for this machine.
        measure: time candidates here (``True``/``"auto"``) or predict (``False``).
        validate: check the plan end to end on held-out calls.
        calibration: how much calibration keeps.
        progress: show progress bars.
    """

    budget: Budget
    calls: tuple[Call, ...]
    families: tuple[str, ...] | None = None
    exclude: Exclude | None = ()
    target: str | None = None
    measure: bool | str = "auto"
    validate: bool = True
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    progress: bool = True

    @classmethod
    def create(
        cls,
        model: torch.nn.Module,
        budget: Any,
        calib: Iterable[Any] | None,
        *,
        families: Sequence[str] | None = None,
        exclude: Exclude | None = (),
        target: str | None = None,
        measure: bool | str | None = None,
        validate: bool = True,
        calibration: CalibrationConfig | None = None,
        progress: bool = True,
    ) -> PlanRequest:
        """The request, validated (see :func:`attnopt.optimize` for the arguments).

        Raises:
            TypeError: ``model`` is not a module.
            ValueError: a malformed budget, unknown families, or no calibration call.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Expected a torch.nn.Module, but got {type(model).__name__}.")
        parsed = parse_budget(budget)
        fams = validate_families(families)
        calls = normalise_calib(calib, model)
        if not calls:
            raise ValueError(
                "Expected at least one calibration example in calib=, but got none. Pass calib=[example_call, ...] "
                "(a tensor, a tuple of positional args or a dict of keyword args), or call "
                "attnopt.optimize(model, budget) without calib= to plan on the model's first calls."
            )
        if measure is None:
            # Planning for this machine: time the candidates the solver may pick (predictions
            # alone can be off for a kernel on a given CPU); for another target, predict.
            measure = "auto" if target is None else False
        return cls(
            parsed, tuple(calls), fams, exclude, target, measure, validate, calibration or CalibrationConfig(), progress
        )

    @property
    def asks_for_speed(self) -> bool:
        """Whether the budget asks for anything faster than exact ("1x" does not)."""
        return not (self.budget.speedup in (None, 1.0) and self.budget.latency_ms is None)

    def split(self) -> tuple[list[Call], list[Call]]:
        """``(calibration calls, held-out calls)``: a share of the calls is kept aside to validate on.

        With one call, or without validation, every call calibrates and the first is also the check.
        """
        calls = list(self.calls)
        n_held = 0 if len(calls) < 2 or not self.validate else max(1, round(len(calls) * self.calibration.heldout_fraction))
        return calls[: len(calls) - n_held], calls[len(calls) - n_held :] or calls[:1]

    def replace(self, **changes: Any) -> PlanRequest:
        """The same request with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
