"""Export an optimised model as a ``torch.export`` program that names each site's variant.

``optimize()`` installs a ``torch.compile``'d forward, and ``torch.export`` does not run
dynamo backends: exporting the model as is traces the *original* attention. :func:`export`
therefore exports the model with the installed wrappers bypassed, finds the attention sites in
the exported graph with the same matchers as :func:`attnopt.find_sites`, rewrites them with the
installed plan's choices (the same :func:`~attnopt.rewriter.rewrite.rewrite_graph` the dynamo
backend runs) and exports the rewritten graph once more, so fitted tensors become constants of
the program and ``torch.export.save``/``load`` round-trip it (after ``import attnopt``, which
registers the operators). The program is checked against the optimised model before it is
returned. MLIR from that program is :mod:`attnopt.rewriter.mlir`'s job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from attnopt.patterns.canon import module_names_of
from attnopt.patterns.context import GraphContext
from attnopt.patterns.find import find_sites_in_graph
from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import rewrites_weights
from attnopt.rewriter.calls import as_call
from attnopt.rewriter.hf_route import suspended
from attnopt.rewriter.install import _ATTR, installed_backends
from attnopt.rewriter.rewrite import Choice, rewrite_graph

__all__ = ["export", "exact_to_sdpa", "attnopt_nodes", "ExportCheckError", "DEFAULT_TOLERANCE"]

log = logging.getLogger("attnopt.rewriter")

#: Largest relative L2 difference allowed between the program and the optimised model. Both run
#: the same kernels on the same inputs; anything above float round-off is a wrong rewrite.
DEFAULT_TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """The exported program does not compute what the optimised model computes."""


def _as_call(example: Any, kwargs: dict | None) -> tuple[tuple, dict]:
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise TypeError(
                f"Expected kwargs as a dict of keyword arguments, but got {type(kwargs).__name__}."
            )
        args = example if isinstance(example, (tuple, list)) else (example,)
        return tuple(args), dict(kwargs)
    return as_call(example if example is not None else ())


@contextlib.contextmanager
def _bypassed(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with every installed wrapper replaced by the forward it wraps.

    The wrapper also turns off the fused ``nn.MultiheadAttention`` fast path, which hides the
    attention inside one opaque op; the same is done here so the sites are visible.
    """
    saved = []
    for _, m in model.named_modules():
        state = m.__dict__.get(_ATTR)
        if state is not None:
            saved.append((m, m.__dict__.get("forward")))
            m.__dict__["forward"] = state[1]
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with suspended(model):  # a registry route: export the model's own attention to rewrite it
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
        for m, fwd in saved:
            m.__dict__["forward"] = fwd


def _chooser(model: torch.nn.Module):
    """The installed plan as ``choose(site)``, for sites named from ``model``'s root."""
    plan = getattr(model, "_attnopt_plan", None)
    if plan is not None:
        from attnopt.rewriter.apply import plan_choices

        choices = plan_choices(plan, applied=True)  # weight rewrites were made; those sites run exact

        def by_plan(site: AttentionSite) -> Choice | None:
            return choices.get(site.name) if site.rewritable else None

        return by_plan
    backends = installed_backends(model)
    if not backends:
        raise ValueError(
            f"Expected a model optimised by attnopt.optimize() or attnopt.apply(), but got a "
            f"{type(model).__name__} without an installed plan. Optimise it first, or use torch.export.export."
        )

    def by_backend(site: AttentionSite) -> Choice | None:
        for path, b in sorted(backends.items(), key=lambda kv: -len(kv[0])):
            prefix = b.prefix or path
            if not prefix or site.module_path == prefix or site.module_path.startswith(prefix + "."):
                return b.choose(site)
        return None

    return by_backend


def _flat_inputs(ep: torch.export.ExportedProgram, gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    from torch.fx._pytree import tree_flatten_spec

    flat = tree_flatten_spec((args, kwargs), ep.call_spec.in_spec)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(flat) != len(placeholders):  # non-tensor leaves are not placeholders
        flat = [x for x in flat if isinstance(x, torch.Tensor)]
    return list(flat)


def attnopt_nodes(graph_or_program: Any) -> list[fx.Node]:
    """The ``torch.ops.attnopt.*`` calls of an ExportedProgram, GraphModule or Graph."""
    graph = getattr(graph_or_program, "graph", graph_or_program)
    graph = getattr(graph, "graph", graph)  # ExportedProgram.graph_module.graph or GraphModule.graph
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "attnopt"
    ]


def _drop_replaced(gm: fx.GraphModule, rewritten: list[AttentionSite]) -> None:
    """Erase the replaced attention left without users.

    Export graphs hold ``aten.scaled_dot_product_attention``, which is tagged
    ``nondeterministic_seeded`` (dropout) and so counts as impure: plain dead-code elimination
    keeps it, and the program would compute every site twice.
    """
    replaced = {n for s in rewritten for n in (*s.graph.internal, s.graph.output)}
    if not replaced:
        return
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n not in replaced and n.is_impure())
    gm.graph.lint()
    gm.recompile()


def _check_planned_sites_found(model: torch.nn.Module, rewritten: list[str]) -> None:
    """A planned variant whose site the export graph does not show would silently be lost."""
    plan = getattr(model, "_attnopt_plan", None)
    if plan is None:
        return
    operators = {e.site for e in plan.entries if e.family != "exact" and not rewrites_weights(e.family)}
    lost = sorted(operators - set(rewritten))
    if lost:
        raise ExportCheckError(
            f"attnopt.export: expected the exported graph to show every planned site, but got none for "
            f"{lost} (rewritten: {sorted(rewritten)}). The model may capture differently under torch.export "
            "than it did when planned; please report it with the model."
        )


def _rewritten_module(model, args, kwargs, strict: bool) -> tuple[fx.GraphModule, list[AttentionSite], int]:
    choose = _chooser(model)
    with _bypassed(model), torch.no_grad():
        try:
            ep = torch.export.export(model, args, kwargs, strict=strict)
        except Exception as e:
            raise RuntimeError(
                f"attnopt.export: torch.export.export could not capture {type(model).__name__} as one graph "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}). "
                "Export the captured parts (model._attnopt_plan.parts) one by one instead."
            ) from e
    gm = ep.module()
    sites = find_sites_in_graph(
        GraphContext(gm, _flat_inputs(ep, gm, args, kwargs), module_names=module_names_of(model))
    )
    choices = {s.name: c for s in sites if (c := choose(s)) is not None}
    n = rewrite_graph(gm, sites, choices)
    _drop_replaced(gm, [s for s in sites if s.name in choices and s.rewritable])
    _check_planned_sites_found(model, [s.name for s in sites if s.name in choices])
    missing = [s.name for s in sites if s.rewritable and s.name not in choices]
    if missing:
        log.info("attnopt.export: sites without a choice keep the model's attention: %s", missing)
    log.info("attnopt.export: %d site(s) found, %d rewritten", len(sites), n)
    return gm, sites, n


def _primary_tensors(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _check(program: torch.export.ExportedProgram, model, args, kwargs, tolerance: float) -> float:
    """Largest relative L2 difference between the program's and the optimised model's outputs."""
    with torch.no_grad():
        want = _primary_tensors(model(*args, **kwargs))
        got = _primary_tensors(program.module()(*args, **kwargs))
    if len(want) != len(got):
        raise ExportCheckError(
            f"attnopt.export: expected the program to return {len(want)} float tensor(s) like the model, "
            f"but got {len(got)}."
        )
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise ExportCheckError(f"Expected an output of shape {tuple(w.shape)}, but got {tuple(g.shape)}.")
        err = float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-12))
        worst = max(worst, err)
    if worst > tolerance:
        raise ExportCheckError(
            f"attnopt.export: expected the exported program to match the optimised model within relative "
            f"L2 {tolerance:g}, but got {worst:.3g}. Please report it with the model; pass check=False to "
            "get the program anyway."
        )
    return worst


def _sdpa_form(node: fx.Node) -> dict[str, Any] | None:
    """SDPA keyword arguments computing the same as this ``attnopt::exact`` call, or None.

    Only cases whose semantics are identical: no window, and causal only with no mask and equal
    query/key lengths (SDPA's causal is top-left aligned, attnopt's bottom-right).
    """
    from attnopt.codegen.ops import parse_config

    q, k, v, mask, params, scale, is_causal, config = node.args
    cfg = parse_config(config)
    if params or cfg.get("window") is not None:
        return None
    qv, kv = q.meta.get("val"), k.meta.get("val")
    if qv is None or kv is None:
        return None
    if is_causal and (mask is not None or qv.shape[-2] != kv.shape[-2]):
        return None
    if mask is not None:
        mv = mask.meta.get("val")
        if mv is None or (mv.dtype != torch.bool and mv.dtype != qv.dtype):
            return None
    return {
        "attn_mask": mask,
        "is_causal": bool(is_causal),
        "scale": float(scale),
        "enable_gqa": qv.shape[1] != kv.shape[1],
    }


def exact_to_sdpa(gm: fx.GraphModule) -> int:
    """Turn ``attnopt::exact`` calls back into ``aten.scaled_dot_product_attention`` where that is
    the same computation, so MLIR consumers see the standard op; returns how many were turned."""
    from attnopt.codegen.ops import op_for

    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != op_for("exact"):
            continue
        form = _sdpa_form(node)
        if form is None:
            log.info("attnopt.export: %s stays attnopt::exact (no SDPA equivalent)", node.format_node())
            continue
        q, k, v = node.args[:3]
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(
                torch.ops.aten.scaled_dot_product_attention.default, (q, k, v), form
            )
            sdpa.meta.update(node.meta)
        node.replace_all_uses_with(sdpa)
        gm.graph.erase_node(node)
        n += 1
    if n:
        gm.graph.lint()
        gm.recompile()
    return n


def export(
    model: torch.nn.Module,
    args: Any = (),
    kwargs: dict | None = None,
    *,
    strict: bool = False,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    exact_as_sdpa: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` an optimised model with its attention sites as ``attnopt`` operators.

    Args:
        model: a model returned by :func:`attnopt.optimize` or :func:`attnopt.apply`.
        args: positional example arguments (a tuple), or one example call as
            :func:`attnopt.rewriter.calls.as_call` accepts it (tensor, tuple, mapping) when ``kwargs`` is None.
        kwargs: keyword example arguments.
        strict: passed to ``torch.export.export``.
        check: run the program and the optimised model on the example and compare.
        tolerance: the largest relative L2 output difference ``check`` accepts.
        exact_as_sdpa: emit ``aten.scaled_dot_product_attention`` instead of ``attnopt::exact``
            where it computes the same (see :func:`exact_to_sdpa`).

    Returns:
        An ExportedProgram whose graph calls ``torch.ops.attnopt.<family>`` at every planned
        site (fitted tensors are program constants); save it with ``torch.export.save``.

    Raises:
        ValueError: ``model`` has no installed plan.
        ExportCheckError: the program's outputs differ from the model's.

    Example::

        >>> ep = attnopt.export(model, {"input_ids": ids, "use_cache": False})
        >>> sorted({str(n.target) for n in attnopt.rewriter.export.attnopt_nodes(ep)})
        ['attnopt.exact.default']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, but got {type(model).__name__}.")
    args, kwargs = _as_call(args, kwargs)
    gm, _, n = _rewritten_module(model, args, kwargs, strict)
    if exact_as_sdpa:
        n -= exact_to_sdpa(gm)
    with torch.no_grad():
        program = torch.export.export(gm, args, kwargs, strict=False)
    if len(attnopt_nodes(program)) < n:
        raise ExportCheckError(
            f"attnopt.export: expected {n} attnopt operator call(s) in the program, but got "
            f"{len(attnopt_nodes(program))}."
        )
    if check:
        err = _check(program, model, args, kwargs, tolerance)
        log.info("attnopt.export: program matches the optimised model (relative L2 %.3g)", err)
    return program


#: Ops the torch-backend lowering must keep as they are: SDPA (exact sites) and the attnopt ops
#: (imported from FX as ``torch.operator "torch.attnopt.<family>"``).
