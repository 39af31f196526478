"""The rule table: every matcher attnopt runs, in one place.

Matching is table-driven: :data:`MATCHERS` lists each matcher as a record (name, the canonical
node kinds it anchors on, its match function), in priority order, and
:func:`attnopt.patterns.find.find_sites_in_graph` consumes the table through
:func:`by_anchor` without knowing any matcher. Adding a way of writing attention means adding
one row here and one match function in its own module; nothing else changes. The name of a
rule is also the ``pattern`` its matches carry, so :data:`PATTERNS` is the vocabulary of
:attr:`AttentionSite.pattern <attnopt.patterns.site.AttentionSite.pattern>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx as fx

from attnopt.patterns.canon import Op
from attnopt.patterns.context import GraphContext
from attnopt.patterns.eager import match_eager_softmax
from attnopt.patterns.mha import match_mha_functional
from attnopt.patterns.records import SiteMatch
from attnopt.patterns.sdpa import match_sdpa, match_sdpa_fused

__all__ = ["Matcher", "MATCHERS", "PATTERNS", "by_anchor"]


@dataclass(frozen=True)
class Matcher:
    """A named matcher: ``match(ctx, node)`` is tried on nodes whose canonical kind is in ``anchors``."""

    name: str
    anchors: tuple[str, ...]
    match: Callable[[GraphContext, fx.Node, Op], SiteMatch | None]


#: Every matcher, in the order they are tried on a node of the same kind.
MATCHERS: tuple[Matcher, ...] = (
    Matcher("sdpa", ("sdpa",), match_sdpa),
    Matcher("mha_functional", ("mha_functional",), match_mha_functional),
    Matcher("sdpa_fused", ("sdpa_fused",), match_sdpa_fused),
    Matcher("eager_softmax", ("softmax",), match_eager_softmax),
)

#: The ``pattern`` names a site can carry: one per rule.
PATTERNS: tuple[str, ...] = tuple(m.name for m in MATCHERS)


def by_anchor(matchers: Iterable[Matcher] = MATCHERS) -> dict[str, list[Matcher]]:
    """Anchor kind -> the matchers tried on nodes of that kind, in table order."""
    out: dict[str, list[Matcher]] = {}
    for m in matchers:
        for a in m.anchors:
            out.setdefault(a, []).append(m)
    return out
