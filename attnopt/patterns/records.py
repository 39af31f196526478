"""The records matchers produce: a raw :class:`SiteMatch` and the :class:`MaskTerm` masks it carries.

They live in a leaf module of their own, apart from any matcher, so that every matcher module
(SDPA, eager, ``multi_head_attention_forward``), the rule table, :mod:`attnopt.patterns.find`
and the rewriter can all import them without importing one another; keeping them inside a
matcher module is what once tied ``matchers`` and ``mha`` into an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["MaskTerm", "SiteMatch"]


@dataclass
class MaskTerm:
    """One mask the scores pass through: ``add`` (additive, times ``multiplier``),
    ``keep`` (bool, True = attend) or ``drop`` (bool, True = masked)."""

    node: fx.Node
    kind: str
    multiplier: float = 1.0


@dataclass
class SiteMatch:
    """Raw result of a matcher: where the site is in the graph and what it computes.

    ``q``/``k``/``v`` are the graph values to feed the operator after the transforms named by
    ``q_form``/``k_form``/``v_form``/``out_form``: ``"bhnd"`` (as is), ``("bh", B, H)`` (a
    ``(B*H, N, D)`` tensor to view as 4-D), ``("perm", dims)`` (permute to BHND), and for k
    ``k_transposed`` says the value is Kᵀ.
    """

    pattern: str
    anchor: fx.Node
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    batch: int
    q_len: int
    kv_len: int
    q_form: Any = "bhnd"
    k_form: Any = "bhnd"
    v_form: Any = "bhnd"
    out_form: Any = "bhnd"
    k_transposed: bool = False
    is_causal: bool = False
    causal_align: str = "bottom_right"
    mask_terms: list[MaskTerm] = field(default_factory=list)
    dropout: float = 0.0
    unsupported: str | None = None
    internal: set = field(default_factory=set)
    #: the factor the operator applies to the q/k it receives; differs from ``scale`` when q or
    #: k was scaled before its head view (Whisper). None means ``scale``.
    op_scale: float | None = None
