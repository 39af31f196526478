"""What the user asks for: a speed target, an accuracy tolerance, and where both are measured.

A budget has a *speed side* (a speedup over the model as given, or an absolute latency) and an
*accuracy side* (a tolerance on an error metric). The planner reads it as one of two problems:

* a speed target is set (``speedup`` or ``latency_ms``): the least error that reaches it;
* no speed target (``Budget(max_error=...)``): the least latency within the tolerance.

The accuracy side is never assumed away: when ``max_error`` is ``None`` the documented default
for the metric applies (:data:`DEFAULT_MAX_ERROR` for ``"output_rel_error"``).

``"1x"`` (and ``None``) mean *exact everywhere*: speedup 1 and zero error, so every site keeps
exact attention and the model's outputs are unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Budget",
    "DEFAULT_MAX_ERROR",
    "DEFAULT_MAX_ERRORS",
    "METRICS",
    "SCOPES",
    "parse_budget",
]

#: Default tolerance on the relative L2 error of a site's attention output against exact
#: attention (``||out - ref|| / ||ref||``). 2% sits above what INT8 Q·Kᵀ attention costs
#: (SageAttention: 1.2-1.3% in ANCHORS.md) and well below where the outputs of a language
#: model's layers drift visibly; it is the tolerance ``"2x"`` is planned against.
DEFAULT_MAX_ERROR = 0.02

#: The error metrics a budget can be stated in, and what ``max_error`` means for each.
METRICS = {
    "auto": "the model's own measure, picked from its output when planning starts: perplexity for a "
    "causal LM (logits over a vocabulary, labels or not), cosine for an encoder (hidden states, pooled "
    "or sentence embeddings), output_rel_error otherwise",
    "output_rel_error": "relative L2 error of attention outputs against exact attention",
    "perplexity": "relative perplexity increase of the model (0.01 = +1%): exp(KL) - 1 of its next-token "
    "distributions, or the increase on the calls' labels when larger",
    "cosine": "1 - cosine similarity of outputs against exact attention",
}

#: Default tolerance per metric (used when ``Budget.max_error`` is None). Perplexity: +1.5%,
#: i.e. log2(1.015) = 0.021 more bits per token: 1.7% of codelm's 1.29 bits per byte (its
#: acceptance bar is 2%), less for models with a higher loss per token.
DEFAULT_MAX_ERRORS = {"auto": DEFAULT_MAX_ERROR, "output_rel_error": DEFAULT_MAX_ERROR, "perplexity": 0.015, "cosine": 2.0e-4}

#: Where the speed side is measured: the attention sites alone, or the whole model forward.
SCOPES = ("attention", "model")

_ACCEPTED = (
    "a speedup string such as '2x' or '1.5x' ('1x' = exact everywhere), "
    "a latency string such as 'latency<=4ms' or 'latency<=800us', "
    "a number (speedup, >= 1), an attnopt.Budget, or None (= '1x')"
)

_SPEEDUP_RE = re.compile(r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*x\s*$", re.IGNORECASE)
_LATENCY_RE = re.compile(
    r"^\s*latency\s*<=?\s*(?P<value>[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?P<unit>ms|us|µs|s)\s*$",
    re.IGNORECASE,
)
_UNIT_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 1.0e-3, "µs": 1.0e-3}


@dataclass(frozen=True)
class Budget:
    """A speed target and an accuracy tolerance.

    Attributes:
        speedup: attention-time (or model-time, see ``scope``) speedup over the model as given,
            measured on the calibration shapes; ``>= 1``. ``None`` when the target is a latency
            or when the planner should simply be as fast as the tolerance allows.
        latency_ms: absolute latency target in milliseconds (``> 0``), exclusive with ``speedup``.
        max_error: tolerance on ``metric``; ``None`` means :data:`DEFAULT_MAX_ERRORS` of the metric.
        metric: one of :data:`METRICS`; ``"auto"`` (the default) is resolved from the model's
            output when planning starts (see :data:`METRICS`), and the plan records the result.
        scope: one of :data:`SCOPES`: ``"model"`` measures one whole forward on the first
            calibration call and plans the speedup of the whole model.

    Example:
        >>> Budget(speedup=2.0).tolerance
        0.02
    """

    VERSION: ClassVar[int] = 1

    speedup: float | None = None
    latency_ms: float | None = None
    max_error: float | None = None
    metric: str = "auto"
    scope: str = "attention"

    def __post_init__(self) -> None:
        _validate_speed(self.speedup, self.latency_ms)
        if self.max_error is not None:
            if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)):
                raise TypeError(f"Expected max_error to be a float or None, but got {self.max_error!r}.")
            if not math.isfinite(self.max_error) or self.max_error < 0:
                raise ValueError(
                    f"Expected max_error >= 0 and finite, but got max_error={self.max_error}. "
                    "Use 0 for exact attention everywhere."
                )
        if self.metric not in METRICS:
            raise ValueError(
                f"Expected metric to be one of {sorted(METRICS)}, but got metric={self.metric!r}."
            )
        if self.scope not in SCOPES:
            raise ValueError(f"Expected scope to be one of {SCOPES}, but got scope={self.scope!r}.")

    @property
    def tolerance(self) -> float:
        """The error tolerance in force: ``max_error`` or the metric's default."""
        return DEFAULT_MAX_ERRORS[self.metric] if self.max_error is None else float(self.max_error)

    @property
    def concrete_metric(self) -> str:
        """The metric in force: ``"auto"`` not yet resolved from a model's output (the planner
        used on its own, without a model) means attention-output error."""
        return "output_rel_error" if self.metric == "auto" else self.metric

    @property
    def exact(self) -> bool:
        """True when the budget allows no error at all (every site stays exact)."""
        return self.tolerance == 0.0

    @property
    def has_speed_target(self) -> bool:
        """True when a speedup above 1 or a latency is asked for."""
        return self.latency_ms is not None or (self.speedup is not None and self.speedup > 1.0)

    def describe(self) -> str:
        """Short text for reports, e.g. ``"2x, output_rel_error<=0.02 (attention)"``."""
        if self.latency_ms is not None:
            speed = f"latency<={self.latency_ms:g}ms"
        elif self.speedup is not None:
            speed = f"{self.speedup:g}x"
        else:
            speed = "fastest"
        return f"{speed}, {self.concrete_metric}<={self.tolerance:g} ({self.scope})"

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict with a version, the inverse of :meth:`from_json`."""
        return {"version": self.VERSION, "fields": dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Budget:
        """Rebuild from :meth:`to_json`; a newer version raises ``ValueError``."""
        if not isinstance(d, dict) or "fields" not in d:
            raise ValueError(f"Expected a budget dict with 'version' and 'fields', but got {d!r}.")
        if int(d.get("version", -1)) > cls.VERSION:
            raise ValueError(
                f"The budget has version {d.get('version')}, newer than this attnopt understands "
                f"({cls.VERSION}); upgrade attnopt to read it."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d["fields"].items() if k in names})


def _validate_speed(speedup: float | None, latency_ms: float | None) -> None:
    for name, value in (("speedup", speedup), ("latency_ms", latency_ms)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected {name} to be a number or None, but got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"Expected a finite {name}, but got {name}={value}.")
    if speedup is not None and speedup < 1.0:
        raise ValueError(
            f"Expected speedup >= 1, but got speedup={speedup}. attnopt only makes attention faster; "
            "use '1x' for exact attention everywhere."
        )
    if latency_ms is not None and latency_ms <= 0:
        raise ValueError(f"Expected latency_ms > 0, but got latency_ms={latency_ms}.")
    if speedup is not None and latency_ms is not None:
        raise ValueError(
            f"Expected either speedup or latency_ms, but got speedup={speedup}, latency_ms={latency_ms}. "
            "Give one speed target."
        )


def parse_budget(budget: str | float | Budget | None) -> Budget:
    """Turn what a user passes as ``budget=`` into a :class:`Budget`.

    Accepted forms: ``"2x"``/``"1.5x"`` (speedup; ``"1x"`` = exact everywhere, zero error),
    ``"latency<=4ms"`` (also ``us``/``s``), a number (speedup), a :class:`Budget` (returned as
    is), or ``None`` (same as ``"1x"``).

    Raises:
        ValueError: for any other string or an invalid value, listing the accepted forms.
        TypeError: for another type.

    Example:
        >>> parse_budget("2x")
        Budget(speedup=2.0, latency_ms=None, max_error=None, metric='auto', scope='attention')
        >>> parse_budget("latency<=500us").latency_ms
        0.5
    """
    if budget is None:
        return Budget(speedup=1.0, max_error=0.0)
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool):
        raise TypeError(f"Expected {_ACCEPTED}, but got budget={budget!r}.")
    if isinstance(budget, (int, float)):
        return _speedup_budget(float(budget), repr(budget))
    if isinstance(budget, str):
        m = _SPEEDUP_RE.match(budget)
        if m:
            return _speedup_budget(float(m.group("value")), repr(budget))
        m = _LATENCY_RE.match(budget)
        if m:
            ms = float(m.group("value")) * _UNIT_TO_MS[m.group("unit").lower()]
            if not ms > 0:
                raise ValueError(
                    f"Expected a positive latency, but got budget={budget!r}. Accepted: {_ACCEPTED}."
                )
            return Budget(latency_ms=ms)
        raise ValueError(f"Expected {_ACCEPTED}, but got budget={budget!r}.")
    raise TypeError(f"Expected {_ACCEPTED}, but got a {type(budget).__name__}: {budget!r}.")


def _speedup_budget(value: float, text: str) -> Budget:
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"Expected a speedup >= 1, but got budget={text}. Accepted: {_ACCEPTED}.")
    if value == 1.0:
        return Budget(speedup=1.0, max_error=0.0)
    return Budget(speedup=value)
