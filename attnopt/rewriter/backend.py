"""The graph rewrite as a dynamo backend: for ``optimize()``'s installed forward and for
``torch.compile(model, backend="attnopt")``.

Dynamo hands the backend each graph it captures (per input shape, after graph breaks, for
prefill and for decode steps alike); the backend finds the attention sites in it with the
same matchers as :func:`attnopt.find_sites`, rewrites those the plan chooses, and either runs
the graph as is (``optimize()``) or hands it to Inductor (``torch.compile``).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from attnopt.patterns.canon import module_names_of
from attnopt.patterns.context import GraphContext
from attnopt.patterns.find import find_sites_in_graph, prefix_sites
from attnopt.patterns.site import AttentionSite
from attnopt.rewriter.rewrite import Choice, rewrite_graph
from attnopt.rewriter.verify import SiteCoverage

__all__ = ["RewriteBackend", "WeakBackend", "attnopt_backend", "weakly"]

log = logging.getLogger("attnopt.rewriter")

ChoiceFn = Callable[[AttentionSite], "Choice | None"]


class RewriteBackend:
    """A dynamo backend that rewrites attention sites by ``choose(site) -> Choice | None``.

    Args:
        choose: the plan, as a function of each site found in a captured graph.
        inductor: compile the rewritten graph with Inductor (``torch.compile`` use) instead of
            running it as is.
        prefix: the compiled module's path in the user's model (a captured part).
        root: the compiled module, when known: its modules name the sites by identity
            (:func:`~attnopt.patterns.canon.module_names_of`) instead of by the source strings
            dynamo records, which depend on how the call reached the model (a wrapper's argument,
            a decorator, ``torch.compile(model.forward)``). Held weakly.
        coverage: records the sites met in every graph, for the installed forward's check
            that the plan matched (:class:`~attnopt.rewriter.verify.SiteCoverage`).

    Without Inductor the backend keeps the rewritten graphs itself (:attr:`graphs`) and hands
    dynamo a function that holds them weakly: dynamo keeps every backend and compiled function
    it is given until ``torch._dynamo.reset()``, so the graphs (and the fitted tensors they hold)
    would otherwise outlive the model that :func:`~attnopt.rewriter.install.install` put them on.
    """

    def __init__(
        self,
        choose: ChoiceFn,
        inductor: bool = False,
        prefix: str = "",
        root: torch.nn.Module | None = None,
        coverage: SiteCoverage | None = None,
    ) -> None:
        self.choose = choose
        self.prefix = prefix
        self.inductor = inductor
        self._root = weakref.ref(root) if root is not None else None
        self.coverage = coverage
        self.compiles: list[dict[str, Any]] = []
        self.graphs: list[fx.GraphModule] = []

    def module_names(self) -> dict[int, str] | None:
        """``id -> name`` of the root's modules now (recomputed: the user may change the model)."""
        root = self._root() if self._root is not None else None
        return module_names_of(root) if root is not None else None

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ):
        """Rewrite ``gm``'s attention sites; with Inductor, compile the result.

        ``mode``/``options`` are what ``torch.compile(..., mode=..., options=...)`` hands a custom
        backend; they configure Inductor as they would without attnopt (``"reduce-overhead"``:
        CUDA graphs; ``"max-autotune"``: autotuning). They are ignored when the graph runs as is.
        """
        # Matching reads shapes (lengths for site metadata, head counts for GQA folding). On a
        # graph dynamo made dynamic, every such read of a symbolic size would install a guard and
        # specialise the graph to this length, so each new length would compile again. The
        # rewrite itself is shape-generic (the operators take their shapes at run time), so the
        # reads are made without guards.
        with _no_shape_guards(example_inputs):
            ctx = GraphContext(gm, example_inputs, module_names=self.module_names())
            sites = find_sites_in_graph(ctx)
            prefix_sites(sites, self.prefix)
            if self.coverage is not None:
                self.coverage.record(sites)
            choices = {}
            for s in sites:
                c = self.choose(s)
                if c is not None:
                    choices[s.name] = c
            n = rewrite_graph(gm, sites, choices)
        self.compiles.append({"sites": [s.name for s in sites], "rewritten": n})
        log.info("attnopt backend: %d site(s) found, %d rewritten", len(sites), n)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            banked = _bank_plan_tensors(gm)
            compiled = compile_fx(gm, example_inputs, config_patches=_inductor_patches(mode, options))
            return _owning(compiled, banked) if banked else compiled
        self.graphs.append(gm)
        return weakly(gm)


def weakly(gm: fx.GraphModule) -> Callable:
    """``gm``'s forward through a weak reference (see :class:`RewriteBackend`)."""
    ref = weakref.ref(gm)

    def run(*args: Any) -> Any:
        graph = ref()
        if graph is None:
            raise RuntimeError(
                "attnopt: this compiled graph was freed with the model it was captured from; optimise the model again."
            )
        return graph(*args)

    return run


class WeakBackend:
    """What dynamo is given in place of a :class:`RewriteBackend`: a weak reference to it.

    Dynamo keeps each backend passed to ``torch.compile`` for the life of the process; this one
    is a few bytes, and the real backend (with its graphs) lives as long as the model holding it.
    """

    def __init__(self, backend: RewriteBackend) -> None:
        self._backend = weakref.ref(backend)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any):
        backend = self._backend()
        if backend is None:
            raise RuntimeError("attnopt: the model this graph was captured for was freed; optimise the model again.")
        return backend(gm, example_inputs, **kwargs)


def _inductor_patches(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Inductor config for a ``torch.compile`` mode and options, as ``torch.compile`` derives it."""
    if not mode and not options:
        return None
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode and mode != "default" else {}), **(options or {})}


def _no_shape_guards(example_inputs: list[Any]):
    """Suppress dynamo shape guards while the backend inspects a graph (no-op without a shape env)."""
    import contextlib

    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    return shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()


def _owning(compiled: Callable, banked: list[Any]) -> Callable:
    """``compiled`` as a function that owns ``banked``: the tensors live exactly as long as it does.

    Dynamo keeps the function a backend returns for as long as the compiled code can run, and
    drops it with the code (a deleted model, ``torch._dynamo.reset()``); the bank holds its
    entries weakly, so they go with it.
    """

    def run(*args: Any) -> Any:
        return compiled(*args)

    run._attnopt_banked = banked  # type: ignore[attr-defined]
    if getattr(compiled, "_boxed_call", False):
        run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _bank_plan_tensors(gm: fx.GraphModule) -> list[Any]:
    """Move the plan's fitted tensors out of the graph into the operators' parameter bank.

    Inductor accepts as constants only the parameters and buffers dynamo recorded, and rejects
    the ``get_attr`` tensors the rewrite adds; the operators find them by ``params_ref`` instead
    (see :func:`attnopt.codegen.ops.bank_params`). Returns the bank entries, which the caller
    must keep alive for as long as the compiled graph runs.
    """
    from attnopt.codegen.ops import FAMILY_OPS, bank_params, op_for
    from attnopt.rewriter.mha import mha_forward

    ops = {op_for(f) for f in FAMILY_OPS}
    banked = set()
    entries = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ops and node.args[4]:
            params, config = node.args[4], node.args[7]
        elif node.target is mha_forward and node.kwargs.get("attnopt_params"):
            params, config = node.kwargs["attnopt_params"], node.kwargs["attnopt_config"]
        else:
            continue
        ref, entry = bank_params([getattr(gm, p.target) for p in params])
        entries.append(entry)
        config = json.dumps({**json.loads(config), "params_ref": ref}, sort_keys=True)
        banked.update(params)
        if node.target is mha_forward:
            node.kwargs = {**node.kwargs, "attnopt_params": [], "attnopt_config": config}
        else:
            node.args = (*node.args[:4], [], *node.args[5:7], config)
    for p in banked:
        if not p.users:
            gm.graph.erase_node(p)
            delattr(gm, p.target)
    if banked:
        gm.recompile()
    return entries


def exact_everywhere(site: AttentionSite) -> Choice | None:
    """The exact plan: every rewritable site runs ``attnopt::exact``."""
    return Choice("exact") if site.rewritable else None


def attnopt_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any):
    """``torch.compile(model, backend="attnopt")``: exact attnopt ops, then Inductor.

    ``torch.compile``'s ``mode``/``options`` reach Inductor (see :meth:`RewriteBackend.__call__`).
    Use :func:`attnopt.backend` to configure a plan or a budget.
    """
    return RewriteBackend(exact_everywhere, inductor=True)(gm, example_inputs, **kwargs)
