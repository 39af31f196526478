"""Matchers: find attention in a graph, whatever way the model wrote it.

This module is the stable import point for the matching layer; the code lives in small modules:

* :mod:`attnopt.patterns.records` — :class:`SiteMatch` and :class:`MaskTerm`, what matchers produce;
* :mod:`attnopt.patterns.sdpa` — ``sdpa`` and ``sdpa_fused`` (``F.scaled_dot_product_attention``
  and the backend ops it lowers to);
* :mod:`attnopt.patterns.eager` (with :mod:`~attnopt.patterns.eager_walks`) — ``eager_softmax``,
  ``softmax(scale · q·kᵀ + masks) [→ dropout] → · v`` written by hand;
* :mod:`attnopt.patterns.mha` — ``mha_functional``, ``F.multi_head_attention_forward`` kept whole;
* :mod:`attnopt.patterns.rules` — the one table of :class:`Matcher` records, :data:`MATCHERS`.

A match function looks at one anchor node and returns a :class:`SiteMatch` (graph references
plus raw facts) or ``None``, logging the reason at debug level. Matching reads the canonical
view of nodes (:mod:`attnopt.patterns.canon`), so ``matmul``/``bmm``/``einsum``, ``mul``/``div``,
``add``/``masked_fill``/``where``, casts and copies are covered once, in every capture method.

Nothing inside :mod:`attnopt.patterns` imports this module (it re-exports, so importing it from
there would only add edges); code outside may keep importing these names from here.
"""

from __future__ import annotations

from attnopt.patterns.eager import match_eager_softmax
from attnopt.patterns.matchutil import log  # noqa: F401  (the logger once defined here)
from attnopt.patterns.records import MaskTerm, SiteMatch
from attnopt.patterns.rules import MATCHERS, Matcher
from attnopt.patterns.sdpa import match_sdpa, match_sdpa_fused

__all__ = [
    "SiteMatch",
    "Matcher",
    "MATCHERS",
    "MaskTerm",
    "match_sdpa",
    "match_sdpa_fused",
    "match_eager_softmax",
]
