"""What every variant family provides, and the registry that finds them.

A family is one module of :mod:`attnopt.replacements` that subclasses :class:`Family` and
registers an instance with :func:`register_family`. For a site it

* says whether it can serve the site at all (:meth:`Family.unsupported_reason`),
* enumerates configurations and fits their parameters on calibration statistics
  (:meth:`Family.candidates` → :class:`Candidate`),
* defines what the variant computes (:meth:`Family.reference`, slow and obviously correct),
* states FLOPs and bytes as sympy expressions of the shape (:meth:`Family.cost`).

Families never time anything or choose: the cost model does that from the numbers they give.
Configs are frozen, versioned dataclasses that round-trip through JSON (:class:`FamilyConfig`).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import sympy
import torch

if TYPE_CHECKING:  # pragma: no cover
    from attnopt.patterns.site import AttentionSite
    from attnopt.patterns.site_stats import SiteStats

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "Candidate",
    "CostFormula",
    "Family",
    "FamilyConfig",
    "SYMBOLS",
    "get_family",
    "register_family",
    "rewrites_weights",
]

#: Every family name, in the order plans and ``optimize(families=...)`` spell them.
FAMILY_NAMES = ("exact", "block_sparse", "quantized", "linear", "head_pruned", "shared")

#: Shape symbols shared by every cost formula: batch, query heads, kv heads, query length,
#: key length, head dim, value head dim, bytes per element of the site's dtype.
SYMBOLS = dict(
    zip(("B", "H", "Hkv", "Nq", "Nk", "D", "Dv", "E"), sympy.symbols("B H Hkv Nq Nk D Dv E", positive=True))
)


@dataclass(frozen=True)
class FamilyConfig:
    """Base of every family's settings: frozen, versioned, JSON round-trippable.

    Subclasses add fields with JSON-friendly types (int, float, str, bool, tuples of those)
    and bump ``VERSION`` when a field's meaning changes.
    """

    VERSION: ClassVar[int] = 1
    family: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"family": self.family, "version": self.VERSION, "fields": d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FamilyConfig:
        if d.get("family") != cls.family:
            raise ValueError(f"Expected a {cls.family!r} config, but got family={d.get('family')!r}.")
        if int(d.get("version", -1)) > cls.VERSION:
            raise ValueError(
                f"The {cls.family!r} config has version {d.get('version')}, newer than this attnopt "
                f"understands ({cls.VERSION}); upgrade attnopt to load it."
            )
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d["fields"].items() if k in types}
        return cls(**fields)

    def describe(self) -> str:
        """Short human text for reports, e.g. ``"sink=4 window=512"``."""
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())

    def key(self) -> str:
        """Stable string identity of the config (for caches)."""
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass(frozen=True)
class CostFormula:
    """FLOPs, bytes and softmax scores of one candidate as sympy expressions of :data:`SYMBOLS`.

    ``scores`` counts the attention scores the kernel exponentiates (and masks, scales,
    quantises): work per score that does not grow with the head dim, unlike the matmul FLOPs.
    Profiles fit a time per score next to the FLOP rate, so a kernel timed at ``D=64`` is not
    predicted twice as slow at ``D=128`` when half of its time was softmax.
    """

    flops: sympy.Expr
    bytes: sympy.Expr
    scores: sympy.Expr = sympy.Integer(0)

    def evaluate(self, **shape: int) -> tuple[float, float]:
        """Numbers at a concrete shape, e.g. ``evaluate(B=1, H=8, Hkv=8, Nq=4096, Nk=4096, D=64, Dv=64)``."""
        subs = {SYMBOLS[k]: v for k, v in shape.items() if k in SYMBOLS}
        return float(self.flops.subs(subs)), float(self.bytes.subs(subs))

    def score_count(self, **shape: int) -> float:
        """``scores`` at a concrete shape (same keywords as :meth:`evaluate`)."""
        subs = {SYMBOLS[k]: v for k, v in shape.items() if k in SYMBOLS}
        return float(sympy.sympify(self.scores).subs(subs))


@dataclass
class Candidate:
    """One fitted way to compute one site.

    Attributes:
        site: the site's name.
        family: a name from :data:`FAMILY_NAMES`.
        config: the family's frozen config.
        params: fitted tensors, in the order the operator receives them (saved as safetensors).
        cost: FLOPs/bytes formulas.
        error: measured relative L2 error of the site output on calibration data (filled by
            the cost model's error measurement; families may pre-fill from fitting).
        notes: anything a report should say (e.g. "density 0.12 at N=2048").
        end_to_end: the model's end-to-end error, in the budget's metric, when this candidate
            alone replaces exact attention on calibration calls (filled by the pipeline for the
            candidates a plan may take; None when not measured).
    """

    site: str
    family: str
    config: FamilyConfig
    params: list[torch.Tensor] = field(default_factory=list)
    cost: CostFormula | None = None
    error: float | None = None
    notes: str = ""
    end_to_end: float | None = None

    @property
    def label(self) -> str:
        return f"{self.family}({self.config.describe()})"


class Family(ABC):
    """Interface of a variant family (see the module docstring)."""

    name: ClassVar[str]
    config_type: ClassVar[type[FamilyConfig]]
    #: True for a variant that rewrites the model's weights (head pruning) instead of running an
    #: operator of its own. Applying a plan runs :meth:`apply_to_model`; the site then runs the
    #: exact operator (on :meth:`applied_inputs`), and a compile backend, which cannot change
    #: weights, cannot run it. Every room asks this, never the family's name.
    rewrites_weights: ClassVar[bool] = False

    def unsupported_reason(self, site: AttentionSite) -> str | None:
        """``None`` if the family can serve ``site``, else one sentence saying why not."""
        if not site.rewritable:
            return f"site {site.name} is not rewritable ({site.reason})"
        return None

    def profile_key(self, config: FamilyConfig) -> str:
        """The device-profile entry whose fitted speed predicts ``config``'s kernel.

        One per kernel: a family whose configs run different kernels (block-sparse's static
        band and its dynamic block selection) names each, ``"<family>:<kernel>"``, so one
        kernel's efficiency is not averaged into another's.
        """
        return self.name

    @abstractmethod
    def candidates(self, site: AttentionSite, stats: SiteStats) -> list[Candidate]:
        """Configurations worth considering for ``site``, fitted on ``stats``."""

    @abstractmethod
    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        candidate: Candidate,
        *,
        scale: float,
        causal: bool,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the variant computes, written plainly; the ground truth for its kernels."""

    def decode_form(self, config: FamilyConfig) -> bool:
        """Whether ``config`` has its own decode form: a one-query step (against a KV cache) run
        by the family's kernel with the same semantics as prefill, e.g. sink+window key
        selection for streaming heads. ``False`` (the default): decode steps run exact attention.
        """
        return False

    def from_exact(self, candidate: Candidate, exact: torch.Tensor) -> torch.Tensor | None:
        """The variant's output computed from exact attention's output, for variants that are a
        function of it (head pruning zeroes heads); ``None`` (the default) when it is not.

        Error measurement computes exact attention anyway; this spares it a second dense pass.
        """
        return None

    def apply_to_model(self, model: torch.nn.Module, site: AttentionSite, entry: Any) -> None:
        """Rewrite ``model``'s weights as the plan entry (or candidate) ``entry`` says.

        Only for families with :attr:`rewrites_weights`; the others run an operator instead.
        """
        raise NotImplementedError(f"family {self.name!r} runs an operator; it does not rewrite weights")

    def applied_inputs(
        self, candidate: Candidate, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the exact operator receives at the site once ``candidate`` is applied to the weights.

        The identity for operator families; a weight rewrite returns its smaller tensors (head
        pruning: the kept heads), so the cost model times what the rewritten model will run.
        """
        return q, k, v

    @abstractmethod
    def cost(self, site: AttentionSite, config: FamilyConfig) -> CostFormula:
        """FLOPs and bytes of the variant as formulas of the shape."""


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to :data:`FAMILIES` under its ``name``."""
    if family.name not in FAMILY_NAMES:
        raise ValueError(f"Expected a family name in {FAMILY_NAMES}, but got {family.name!r}.")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The registered family called ``name``; raises ``ValueError`` listing the known ones.

    The built-in families are registered by the package's ``__init__``, which Python runs
    before this module is ever imported, so they are always present here.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown family {name!r}; expected one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


def rewrites_weights(name: str) -> bool:
    """Whether the family called ``name`` rewrites weights (:attr:`Family.rewrites_weights`).

    False for a name no family is registered under (tests run ad-hoc kernels under new names).
    """
    family = FAMILIES.get(name)
    return bool(family is not None and family.rewrites_weights)
