"""The site spec: the invariants every :class:`~attnopt.patterns.site.AttentionSite` keeps, checked in one place.

Everything downstream of matching — calibration, the families, the planner, the rewriter —
reads sites without re-deriving them from the graph, so a matcher that records, say, 6 query
heads over 4 key/value heads, or a zero scale, would surface far away as a wrong shape in a
kernel or a silently different output. As tinygrad checks a graph against its spec before
lowering it, attnopt checks sites at the two seams where they change hands:

* when matching ends (:func:`attnopt.patterns.find.find_sites_in_graph`): a site that breaks the
  spec is kept out of rewriting (``rewritable=False`` with the problems as its ``reason``), so
  every *rewritable* site matching returns passes :func:`check_site`;
* when rewriting starts (:func:`attnopt.rewriter.rewrite.rewrite_graph`, via
  :func:`check_sites`): nothing is rewritten from a site edited into an invalid state since.

:func:`site_problems` lists what is wrong (empty when valid); :func:`check_site` raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from attnopt.patterns.records import SiteMatch
from attnopt.patterns.rules import PATTERNS
from attnopt.patterns.site import LAYOUTS, MASK_KINDS, PROJECTION_KEYS, UNKNOWN_SIZE, AttentionSite

__all__ = ["site_problems", "check_site", "check_sites"]

#: Mask kinds that are a causal constraint themselves.
_CAUSAL_KINDS = ("causal", "sliding_window")
#: Fields a site copies from its :class:`SiteMatch`; the rewriter acts on the match's.
_FROM_MATCH = ("pattern", "num_heads", "num_kv_heads", "head_dim", "head_dim_v", "batch", "q_len", "kv_len")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _expect(out: list[str], ok: bool, what: str, got: str) -> None:
    """Record ``expected <what>, but got <got>`` unless ``ok``."""
    if not ok:
        out.append(f"expected {what}, but got {got}")


def _structure_problems(s: AttentionSite) -> list[str]:
    """Identity, heads and sizes."""
    out: list[str] = []
    _expect(out, _is_int(s.index) and s.index >= 0, "index to be an int >= 0", f"index={s.index!r}")
    if _is_int(s.index):
        ok = isinstance(s.name, str) and s.name.endswith(f"#{s.index}")
        _expect(out, ok, f"name to end with '#{s.index}' (module path # index)", f"name={s.name!r}")
    _expect(out, s.pattern in PATTERNS, f"pattern to be one of {PATTERNS}", f"pattern={s.pattern!r}")
    for f in ("num_heads", "num_kv_heads", "head_dim", "head_dim_v"):
        v = getattr(s, f)
        _expect(out, _is_int(v) and v > 0, f"{f} to be a positive int", f"{f}={v!r}")
    h, hkv = s.num_heads, s.num_kv_heads
    if _is_int(h) and _is_int(hkv) and hkv > 0:
        _expect(out, h % hkv == 0, "num_heads divisible by num_kv_heads", f"{h} and {hkv}")
    for f in ("batch", "q_len", "kv_len"):
        v = getattr(s, f)
        ok = _is_int(v) and (v > 0 or v == UNKNOWN_SIZE)
        _expect(out, ok, f"{f} to be a positive int (or {UNKNOWN_SIZE} if symbolic)", f"{f}={v!r}")
    return out


def _semantics_problems(s: AttentionSite) -> list[str]:
    """Scale, mask, window, causality, dropout, layout."""
    out: list[str] = []
    ok = _is_real(s.scale) and math.isfinite(s.scale) and s.scale != 0
    _expect(out, ok, "scale to be a finite, nonzero float", f"scale={s.scale!r}")
    _expect(out, s.mask in MASK_KINDS, f"mask to be one of {MASK_KINDS}", f"mask={s.mask!r}")
    if s.mask == "sliding_window":
        ok = _is_int(s.window) and s.window > 0
        _expect(out, ok, "a positive int window on a sliding_window mask", f"window={s.window!r}")
    else:
        _expect(out, s.window is None, "window=None unless mask='sliding_window'", f"window={s.window!r}")
    _expect(out, isinstance(s.causal, bool), "causal to be a bool", f"causal={s.causal!r}")
    if s.mask in _CAUSAL_KINDS:
        _expect(out, s.causal is True, f"causal=True with mask={s.mask!r}", f"causal={s.causal!r}")
    if s.mask == "none":
        _expect(out, not s.causal, "causal=False with mask='none' (causal is mask='causal')", "causal=True")
    ok = _is_real(s.dropout) and 0.0 <= s.dropout <= 1.0
    _expect(out, ok, "dropout in [0, 1]", f"dropout={s.dropout!r}")
    if ok and s.rewritable:
        _expect(out, s.dropout == 0, "dropout=0 on a rewritable site (no variant applies it)", f"{s.dropout}")
    _expect(out, s.layout in LAYOUTS, f"layout to be one of {LAYOUTS}", f"layout={s.layout!r}")
    for f in ("mask_static", "cross"):
        _expect(out, isinstance(getattr(s, f), bool), f"{f} to be a bool", f"{f}={getattr(s, f)!r}")
    return out


def _record_problems(s: AttentionSite) -> list[str]:
    """Rewritability, projections, dtype and the capture-time match."""
    out: list[str] = []
    _expect(out, isinstance(s.rewritable, bool), "rewritable to be a bool", f"rewritable={s.rewritable!r}")
    if s.rewritable is True:
        _expect(out, s.reason is None, "reason=None on a rewritable site", f"reason={s.reason!r}")
    elif s.rewritable is False:
        ok = isinstance(s.reason, str) and bool(s.reason)
        _expect(out, ok, "a reason on a site that is not rewritable", f"reason={s.reason!r}")
    p = s.projections
    ok = (
        isinstance(p, dict) and set(p) <= set(PROJECTION_KEYS) and all(isinstance(v, str) for v in p.values())
    )
    _expect(out, ok, f"projections to map keys of {PROJECTION_KEYS} to module paths", f"{p!r}")
    if ok:
        ok = not ("qkv" in p and set(p) & {"q", "k", "v"})
        _expect(out, ok, "a packed 'qkv' projection or separate q/k/v ones", f"{sorted(p)}")
    _expect(out, isinstance(s.dtype, str) and bool(s.dtype), "dtype to be a non-empty str", f"{s.dtype!r}")
    m = s.graph
    if isinstance(m, SiteMatch):
        for f in _FROM_MATCH:
            a, b = getattr(s, f), getattr(m, f)
            _expect(
                out,
                a == b,
                f"{f} to agree with the graph match",
                f"{f}={a!r} on the site, {b!r} in the match",
            )
    else:
        _expect(out, m is None, "graph to be None or a SiteMatch", type(m).__name__)
    return out


def site_problems(site: AttentionSite) -> list[str]:
    """Every invariant ``site`` breaks, one sentence each; empty when the site is valid."""
    return _structure_problems(site) + _semantics_problems(site) + _record_problems(site)


def check_site(site: AttentionSite) -> None:
    """Raise ``ValueError`` naming ``site`` and each invariant it breaks; return None when valid."""
    problems = site_problems(site)
    if problems:
        raise ValueError(f"Invalid attention site {site.name!r}: {'; '.join(problems)}.")


def check_sites(sites: Iterable[AttentionSite]) -> None:
    """:func:`check_site` on every site, raising one ``ValueError`` that names all invalid ones."""
    bad = [(s, p) for s in sites if (p := site_problems(s))]
    if bad:
        lines = "\n".join(f"  {s.name!r}: {'; '.join(p)}" for s, p in bad)
        raise ValueError(f"Invalid attention site(s) ({len(bad)}):\n{lines}")
