"""What matchers may ask of a captured graph: which nodes are weights, example values, data flow.

A :class:`GraphContext` wraps one FX graph (from torch.export, dynamo or symbolic_trace) with
its flat example inputs. Matchers use it to tell activations from weights (a router's
``softmax(x @ W)`` is not attention), to evaluate small subgraphs on the example (a mask's
value, to classify it) and to decide whether a mask depends on input *values* or only on shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from attnopt.patterns.canon import module_path_of, node_val

__all__ = ["GraphContext"]

_WEIGHT_MARKERS = ("_parameters_", "_buffers_")


class GraphContext:
    """A graph plus its example inputs, with cached value evaluation.

    Args:
        gm: the captured GraphModule.
        example_inputs: one value per placeholder, in placeholder order (may be empty when
            only metadata is available; mask values are then unknown).
        weight_placeholders: names of placeholders that hold parameters or buffers (dynamo
            lifts them into placeholders); detected from names and ``nn.Parameter`` values
            when not given.
        module_names: ``id(module) -> name`` for the captured root's modules
            (:func:`~attnopt.patterns.canon.module_names_of`), so sites are named by the model's
            own ``named_modules()`` whatever path the tracer recorded; without it, recorded
            paths are normalised as text.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any] = (),
        weight_placeholders: set[str] | None = None,
        module_names: Mapping[int, str] | None = None,
    ) -> None:
        self.gm = gm
        self.module_names = module_names
        self.graph = gm.graph
        self.placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.example = dict(zip(self.placeholders, example_inputs)) if example_inputs else {}
        if weight_placeholders is None:
            weight_placeholders = {
                n.name
                for n in self.placeholders
                if any(m in n.name for m in _WEIGHT_MARKERS)
                or isinstance(self.example.get(n), torch.nn.Parameter)
            }
        self.weight_placeholders = weight_placeholders
        self._values: dict[fx.Node, Any] = {}
        self._data_dep: dict[fx.Node, bool] = {}
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}

    def module_path(self, node: fx.Node) -> str:
        """The path of the module owning ``node`` (see :func:`~attnopt.patterns.canon.module_path_of`)."""
        return module_path_of(node, self.module_names)

    # -- classification of leaves -----------------------------------------------------------
    def is_weight(self, node: Any) -> bool:
        """A parameter, buffer or constant: a get_attr, or a weight placeholder."""
        if not isinstance(node, fx.Node):
            return True  # a Python constant
        if node.op == "get_attr":
            return True
        return node.op == "placeholder" and node.name in self.weight_placeholders

    def is_constant(self, node: Any) -> bool:
        """A value computed from weights and constants only (e.g. a slice of a packed weight)."""
        if not isinstance(node, fx.Node):
            return True
        if self.is_weight(node):
            return True
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if self.is_user_input(n):
                return False
            stack.extend(n.all_input_nodes)
        return True

    def is_user_input(self, node: fx.Node) -> bool:
        return node.op == "placeholder" and node.name not in self.weight_placeholders

    # -- data flow ---------------------------------------------------------------------------
    def depends_on_input_values(self, node: fx.Node) -> bool:
        """Whether ``node``'s value depends on the *values* of a user input.

        Edges that carry only sizes (``x.size()``, ``sym_size``) do not count, so masks built
        from ``arange(seq_len)`` are shape-only, while masks built from ``attention_mask`` are not.
        """
        if node in self._data_dep:
            return self._data_dep[node]
        stack, seen, result = [node], set(), False
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if self.is_user_input(n):
                result = True
                break
            for inp in n.all_input_nodes:
                if _carries_tensor(inp):
                    stack.append(inp)
        self._data_dep[node] = result
        return result

    # -- values ------------------------------------------------------------------------------
    def value(self, node: Any) -> Any:
        """The example value of ``node``, computed by running only its ancestors.

        Returns ``None`` when no example inputs were given or evaluation fails (the caller
        then treats the value as unknown).
        """
        if not isinstance(node, fx.Node):
            return node
        if node in self._values:
            return self._values[node]
        if not self.example and any(self.is_user_input(p) for p in self.placeholders):
            return None
        try:
            for n in self._ancestors_in_order(node):
                if n not in self._values:
                    self._values[n] = self._run_node(n)
        except Exception:  # noqa: BLE001 - unknown value; the caller falls back safely
            return None
        return self._values.get(node)

    def _ancestors_in_order(self, node: fx.Node) -> list[fx.Node]:
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen or n in self._values:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return sorted(seen, key=self.order.__getitem__)

    def _run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            if n in self.example:
                return self.example[n]
            raise KeyError(n.name)
        if n.op == "get_attr":
            obj = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        args = fx.node.map_arg(n.args, lambda a: self._values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self._values[a])
        with torch.no_grad():
            if n.op == "call_function":
                return n.target(*args, **kwargs)
            if n.op == "call_method":
                self_obj, *rest = args
                return getattr(self_obj, n.target)(*rest, **kwargs)
            if n.op == "call_module":
                return self.gm.get_submodule(n.target)(*args, **kwargs)
        raise RuntimeError(f"cannot evaluate node {n.format_node()}")


def _carries_tensor(node: fx.Node) -> bool:
    from torch.fx.passes.shape_prop import TensorMetadata

    v = node_val(node)
    if v is None or isinstance(v, TensorMetadata):
        return True
    if isinstance(v, (torch.SymInt, int, float, bool, torch.Size)):
        return False
    if isinstance(v, (list, tuple)):
        return any(hasattr(x, "shape") for x in v)
    return True
