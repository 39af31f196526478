"""Replace attention sites in a graph with calls of the ``attnopt::<family>`` operators.

The rewrite knows nothing about how a variant computes attention: it puts q/k/v into the
operator's ``(B, H, N, D)`` layout (undoing einsum permutations, ``(B*H)`` batching and a Kᵀ
operand), combines the model's masks into one tensor, calls the operator with the site's
choice (family, JSON config, fitted tensors) and restores the model's output layout and dtype.
Every mutation ends with dead-code elimination, ``graph.lint()`` and ``recompile()``.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from attnopt.codegen.memo import forget_when_freed
from attnopt.codegen.ops import forget_rewrites, op_for
from attnopt.patterns.canon import is_assertion, node_dtype
from attnopt.patterns.records import SiteMatch
from attnopt.patterns.site import AttentionSite
from attnopt.patterns.spec import check_sites
from attnopt.replacements.base import rewrites_weights

__all__ = ["Choice", "rewrite_graph", "RewriteError"]

log = logging.getLogger("attnopt.rewriter")
aten = torch.ops.aten


_REWRITE_IDS = itertools.count()


class RewriteError(RuntimeError):
    """A site could not be rewritten; the message names the pass and the node."""


@dataclass
class Choice:
    """What one site runs: an operator family, its JSON config and fitted tensors."""

    family: str = "exact"
    config: dict[str, Any] = field(default_factory=dict)
    params: list[torch.Tensor] = field(default_factory=list)
    min_q_len: int = 2
    min_kv_len: int = 0


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    return graph.call_function(target, tuple(args))


def _to_bhnd(graph: fx.Graph, x: fx.Node, form: Any) -> fx.Node:
    if form == "bhnd":
        return x
    if form[0] == "bh":
        _, b, h = form
        return _call(graph, aten.unflatten.int, x, 0, [b, h])
    if form[0] == "perm":
        return _call(graph, aten.permute.default, x, list(form[1]))
    raise RewriteError(f"unknown layout form {form!r}")


def _from_bhnd(graph: fx.Graph, x: fx.Node, form: Any) -> fx.Node:
    if form == "bhnd":
        return x
    if form[0] == "bh":
        return _call(graph, aten.flatten.using_ints, x, 0, 1)
    if form[0] == "perm":
        return _call(graph, aten.permute.default, x, list(form[1]))
    raise RewriteError(f"unknown layout form {form!r}")


def _mask_to_4d(graph: fx.Graph, mask: fx.Node, m: SiteMatch) -> fx.Node:
    shape = mask.meta.get("val", mask.meta.get("example_value"))
    rank = len(shape.shape) if shape is not None and hasattr(shape, "shape") else 4
    if isinstance(m.q_form, tuple) and m.q_form[0] == "bh" and rank == 3:
        b, h = m.q_form[1], m.q_form[2]
        if shape is not None and int(shape.shape[0]) == b * h:
            return _call(graph, aten.unflatten.int, mask, 0, [b, h])
        return _call(graph, aten.unsqueeze.default, mask, 0)
    return mask


def _combined_mask(graph: fx.Graph, m: SiteMatch) -> fx.Node | None:
    if not m.mask_terms:
        return None
    parts = []
    for t in m.mask_terms:
        if t.kind == "keep":
            parts.append(t.node)
        elif t.kind == "drop":
            parts.append(_call(graph, aten.logical_not.default, t.node))
        elif len(m.mask_terms) == 1:
            return _mask_to_4d(graph, t.node, m)  # one additive mask: pass it as SDPA does
        else:
            parts.append(_call(graph, aten.ge.Scalar, t.node, -1.0e3))
    out = parts[0]
    for p in parts[1:]:
        out = _call(graph, aten.logical_and.default, out, p)
    if node_dtype(out) not in (torch.bool, None):
        out = _call(graph, aten.ne.Scalar, out, 0)
    return _mask_to_4d(graph, out, m)


def _param_nodes(gm: fx.GraphModule, site: AttentionSite, params: list[torch.Tensor]) -> list[fx.Node]:
    nodes = []
    base = "_attnopt_" + "".join(c if c.isalnum() else "_" for c in site.name)
    for i, t in enumerate(params):
        name = f"{base}_p{i}"
        gm.register_buffer(name, t, persistent=False)
        nodes.append(gm.graph.get_attr(name))
    return nodes


def op_config(site_name: str, choice: Choice, *, mask_static: bool, causal_align: str) -> str:
    """The ``config`` string an operator call for ``choice`` at ``site_name`` receives.

    One place for graph rewrites and export-time routing (:mod:`attnopt.rewriter.export_mode`),
    so both hand the operators the same keys.
    """
    cfg = {
        "site": site_name,
        # Unique per rewritten site: the operator caches per-shape facts about static masks
        # under this key, and two models (or two captures) may share site names.
        "rewrite_id": next(_REWRITE_IDS),
        "family": choice.family,
        "config": choice.config,
        "mask_static": mask_static,
        "window": None,
        "causal_align": causal_align,
        "min_q_len": choice.min_q_len,
        "min_kv_len": choice.min_kv_len,
        # An installed plan's variant that fails at run time falls back to exact attention for
        # that call (see attnopt.codegen.ops); planning's own calls never set this, so a broken
        # candidate fails its measurement instead of looking exact.
        "fallback": True,
    }
    return json.dumps(cfg, sort_keys=True)


def op_family(choice: Choice) -> str:
    """The operator that runs ``choice``: a weight rewrite (head pruning) runs exact attention on its
    rewritten weights."""
    return "exact" if rewrites_weights(choice.family) else choice.family


def _op_config(site: AttentionSite, choice: Choice, m: SiteMatch) -> str:
    return op_config(site.name, choice, mask_static=site.mask_static, causal_align=m.causal_align)


def _op_scale(site: AttentionSite, m: SiteMatch) -> float:
    """The scale the operator applies to the q/k it receives (see ``SiteMatch.op_scale``)."""
    return site.scale if m.op_scale is None else m.op_scale


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, choice: Choice) -> fx.Node:
    """Replace one site's output with an operator call; returns the new output node."""
    m: SiteMatch = site.graph
    graph = gm.graph
    family = op_family(choice)
    if m.pattern == "mha_functional":
        return _retarget_mha(gm, site, choice, family, m)
    with graph.inserting_before(m.output):
        q = _to_bhnd(graph, m.q, m.q_form)
        k = m.k
        if m.k_transposed:
            k = _call(graph, aten.transpose.int, k, -1, -2)
        k = _to_bhnd(graph, k, m.k_form)
        v = _to_bhnd(graph, m.v, m.v_form)
        mask = _combined_mask(graph, m)
        params = _param_nodes(gm, site, choice.params) if choice.params else []
        out = graph.call_function(
            op_for(family),
            (
                q,
                k,
                v,
                mask,
                params,
                float(_op_scale(site, m)),
                bool(m.is_causal),
                _op_config(site, choice, m),
            ),
        )
        out = _from_bhnd(graph, out, m.out_form)
        want = node_dtype(m.output)
        if want is not None and node_dtype(m.v) is not None and want != node_dtype(m.v):
            out = _call(graph, aten._to_copy.default, out)
            out.kwargs = {"dtype": want}
    m.output.replace_all_uses_with(out)
    # export's metadata assertions on the replaced nodes would keep them alive: drop them.
    for n in list(m.internal) + [m.output]:
        for u in list(n.users):
            if is_assertion(u) and not u.users:
                graph.erase_node(u)
    return out


def _retarget_mha(
    gm: fx.GraphModule, site: AttentionSite, choice: Choice, family: str, m: SiteMatch
) -> fx.Node:
    from attnopt.rewriter.mha import mha_forward

    node = m.anchor
    extra = {"attnopt_family": family, "attnopt_config": _op_config(site, choice, m)}
    if choice.params:
        with gm.graph.inserting_before(node):
            extra["attnopt_params"] = _param_nodes(gm, site, choice.params)
    node.target = mha_forward
    node.kwargs = {**node.kwargs, **extra}
    return node


def rewrite_graph(gm: fx.GraphModule, sites: list[AttentionSite], choices: dict[str, Choice]) -> int:
    """Rewrite every rewritable site that has a choice; returns how many were rewritten."""
    check_sites(s for s in sites if s.rewritable and choices.get(s.name) is not None)
    n = 0
    for site in sites:
        choice = choices.get(site.name)
        if choice is None or not site.rewritable:
            continue
        try:
            rewrite_site(gm, site, choice)
        except Exception as e:
            raise RewriteError(
                f"attnopt.rewrite: failed to rewrite site {site.name} at {site.graph.output.format_node()}: {e}"
            ) from e
        n += 1
    if n:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        ids = _rewrite_ids(gm)
        if ids:  # the operators' per-site caches go with the graph
            forget_when_freed(gm, forget_rewrites, ids)
    return n


def _rewrite_ids(gm: fx.GraphModule) -> frozenset[int]:
    """The ``rewrite_id`` of every attnopt operator call in ``gm`` (see :func:`op_config`)."""
    ids = set()
    for node in gm.graph.nodes:
        for arg in node.args:
            if isinstance(arg, str) and '"rewrite_id"' in arg:
                ids.add(json.loads(arg)["rewrite_id"])
    return frozenset(ids)
