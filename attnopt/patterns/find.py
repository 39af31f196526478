"""Run the matchers over a graph and turn each match into a normalised :class:`AttentionSite`.

This is the one place where raw matches meet the model: masks are evaluated on the example
and classified, projections and cross-attention are read off the dataflow, and names are given
(owning module path + index). Results are written to ``node.meta["attnopt.site"]`` of each
site's output node, as typed records (torch.fx pass habit).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.fx as fx

from attnopt.patterns.canon import canon, node_dtype, relink_inplace_uses
from attnopt.patterns.context import GraphContext
from attnopt.patterns.masks import additive_to_allowed, causal_allowed, classify_allowed
from attnopt.patterns.records import SiteMatch
from attnopt.patterns.rules import by_anchor
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.spec import site_problems
from attnopt.patterns.walk import find_projection, linear_input, projection_path, strip_identity

__all__ = ["find_sites_in_graph", "assign_names", "prefix_sites", "META_KEY"]

log = logging.getLogger("attnopt.patterns")

#: ``node.meta`` key holding the :class:`AttentionSite` of a site's output node.
META_KEY = "attnopt.site"


def find_sites_in_graph(ctx: GraphContext, module_paths: dict[str, str] | None = None) -> list[AttentionSite]:
    """Every attention site of ``ctx``'s graph, in graph order.

    Args:
        ctx: the graph and its example inputs.
        module_paths: optional map from raw module paths to the model's own (for graphs whose
            module stack is missing, e.g. symbolic_trace of a plain function).

    Returns:
        Sites with ``site.graph`` set to the :class:`SiteMatch` the rewriter needs; every
        rewritable one passes :func:`attnopt.patterns.spec.check_site`.
    """
    relink_inplace_uses(ctx.gm)  # in-place ops in dataflow form before any walk reads the graph
    matches: list[SiteMatch] = []
    by_kind = by_anchor()
    claimed: set[fx.Node] = set()
    for node in ctx.graph.nodes:
        op = canon(node, ctx.gm)
        if op is None or op.kind not in by_kind or node in claimed:
            continue
        for matcher in by_kind[op.kind]:
            match = matcher.match(ctx, node, op)
            if match is not None:
                matches.append(match)
                claimed.add(match.output)
                break
    sites = [_to_site(ctx, m) for m in matches]
    assign_names(sites)
    for s in sites:
        _keep_if_invalid(s)
        s.graph.output.meta[META_KEY] = s
    return sites


def _keep_if_invalid(site: AttentionSite) -> None:
    """Keep a site that breaks the spec (:mod:`attnopt.patterns.spec`) out of rewriting.

    A broken match is a matcher's mistake about one site, not the model's: the model keeps its
    own code there (always correct) while the other sites are still optimised, and
    ``find_sites`` can still list it, with the problems as its reason. Raising instead would
    make a whole model unusable for one odd site.
    """
    problems = site_problems(site)
    if not problems:
        return
    log.warning("attnopt: site %s breaks the site spec and is kept as is: %s", site.name, "; ".join(problems))
    if site.rewritable:
        site.rewritable = False
        site.reason = f"the match breaks the site spec: {'; '.join(problems)}"


def prefix_sites(sites: list[AttentionSite], prefix: str) -> None:
    """Make module paths of sites found in a captured *submodule* relative to the model root."""
    if not prefix:
        return
    for s in sites:
        s.module_path = f"{prefix}.{s.module_path}" if s.module_path else prefix
    assign_names(sites)


def assign_names(sites: list[AttentionSite]) -> None:
    """Name sites ``<module path>#<index within that module>`` in the given order."""
    counts: dict[str, int] = defaultdict(int)
    for s in sites:
        s.index = counts[s.module_path]
        counts[s.module_path] += 1
        s.name = f"{s.module_path or '<root>'}#{s.index}"


def _to_site(ctx: GraphContext, m: SiteMatch) -> AttentionSite:
    mask, window, static, causal, mask_reason = _classify_mask(ctx, m)
    q_proj = find_projection(m.q, ctx)
    k_proj = find_projection(m.k, ctx)
    v_proj = find_projection(m.v, ctx)
    o_proj = _output_projection(ctx, m)
    projections: dict[str, str] = {}
    if q_proj and k_proj and v_proj and q_proj.module_path == k_proj.module_path == v_proj.module_path:
        projections["qkv"] = q_proj.module_path
    else:
        for key, p in (("q", q_proj), ("k", k_proj), ("v", v_proj)):
            if p is not None:
                projections[key] = p.module_path
    if o_proj is not None:
        projections["o"] = o_proj
    cross = bool(q_proj and k_proj and strip_identity(q_proj.input) is not strip_identity(k_proj.input))
    reason = m.unsupported or mask_reason
    dtype = node_dtype(m.q)
    layout = (
        {"bhnd": "bhnd", "mha": "nbe"}.get(m.q_form, None)
        if isinstance(m.q_form, str)
        else ("(bh)nd" if m.q_form[0] == "bh" else "einsum")
    )
    return AttentionSite(
        name="",
        module_path=ctx.module_path(m.output) or ctx.module_path(m.anchor),
        index=0,
        pattern=m.pattern,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        head_dim_v=m.head_dim_v,
        q_len=m.q_len,
        kv_len=m.kv_len,
        batch=m.batch,
        causal=causal,
        scale=float(m.scale),
        mask=mask,
        window=window,
        mask_static=static,
        cross=cross,
        dropout=m.dropout,
        layout=layout or "bhnd",
        dtype=str(dtype).replace("torch.", "") if dtype is not None else "unknown",
        rewritable=reason is None,
        reason=reason,
        projections=projections,
        graph=m,
    )


def _classify_mask(ctx: GraphContext, m: SiteMatch) -> tuple[str, int | None, bool, bool, str | None]:
    """(kind, window, static, causal, reason-if-unrewritable) of the site's mask."""
    if not m.mask_terms:
        return ("causal" if m.is_causal else "none"), None, True, m.is_causal, None
    static = not any(ctx.depends_on_input_values(t.node) for t in m.mask_terms)
    allowed, bias = None, False
    for t in m.mask_terms:
        val = ctx.value(t.node)
        if not isinstance(val, torch.Tensor):
            return "tensor", None, False, m.is_causal, None
        if t.kind == "add":
            a = additive_to_allowed(val)
            if a is None:  # a real bias: what it masks out (-inf entries) still tells causality
                bias, a = True, val > -1.0e3
        elif t.kind == "keep":
            a = val.bool()
        elif t.kind == "add_keys":
            a = (val > -1.0e3).reshape(val.shape[0], 1, 1, val.shape[-1])
        elif t.kind == "drop_keys":
            a = (~val.bool()).reshape(val.shape[0], 1, 1, val.shape[-1])
        else:
            a = ~val.bool()
        a = _as_4d(a, m)
        allowed = a if allowed is None else (allowed & a)
    if bias:
        return "bias", None, static, m.is_causal or _causal_under(allowed, m), _BIAS_REASON
    if m.is_causal:
        allowed = allowed & causal_allowed(m.q_len, m.kv_len, allowed.device)
    kind, window = classify_allowed(allowed)
    causal = kind in ("causal", "sliding_window")
    if kind == "padding":
        # Causal only when the example shows it: inside the causal triangle, and not a plain key-padding
        # mask (whose rows are the same for every query and happen to fit the triangle when one key is kept).
        causal = (
            m.q_len > 1
            and not bool((allowed & ~causal_allowed(m.q_len, m.kv_len, allowed.device)).any())
            and bool((allowed != allowed[..., :1, :]).any())
        )
    if not static and kind in ("none", "causal"):
        kind = "padding"  # computed from the inputs: this example kept every key, the next may not
    return kind, window, static, causal, None


_BIAS_REASON = (
    "scores carry an additive bias (e.g. relative position or ALiBi) that no variant reproduces yet"
)


def _causal_under(allowed: torch.Tensor, m: SiteMatch) -> bool:
    """Whether a mask pattern (e.g. the -inf part of a bias) is causal, alone or with padding."""
    a = _as_4d(allowed, m)
    kind, _ = classify_allowed(a)
    if kind in ("causal", "sliding_window"):
        return True
    return (
        kind != "none" and m.q_len > 1 and not bool((a & ~causal_allowed(m.q_len, m.kv_len, a.device)).any())
    )


def _as_4d(a: torch.Tensor, m: SiteMatch) -> torch.Tensor:
    """Broadcast a mask to ``(B or 1, H or 1, Nq, Nk)`` in attnopt's head layout."""
    bh_form = (m.q_form[1], m.q_form[2]) if isinstance(m.q_form, tuple) and m.q_form[0] == "bh" else None
    if m.q_form == "mha":
        bh_form = (m.batch, m.num_heads)
    if bh_form and a.dim() == 3:
        b, h = bh_form
        a = a.reshape(b, h, *a.shape[-2:]) if a.shape[0] == b * h else a.unsqueeze(0)
    while a.dim() < 4:
        a = a.unsqueeze(0)
    if a.dim() > 4:
        a = a.reshape(-1, *a.shape[-3:])
    if a.shape[-2:] != (m.q_len, m.kv_len):
        a = a.expand(*a.shape[:-2], m.q_len, m.kv_len)
    return a


_OUT_PASS = ("identity", "transpose", "permute", "reshape")


def _output_projection(ctx: GraphContext, m: SiteMatch) -> str | None:

    cur = m.output
    for _ in range(10):
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if linear_input(u, ctx) is cur:
            return projection_path(u, ctx)
        op = canon(u, ctx.gm)
        name = str(getattr(u.target, "__name__", u.target))
        if (op is None or op.kind not in _OUT_PASS) and not any(
            s in name for s in ("contiguous", "flatten", "view")
        ):
            return None
        cur = u
    return None
