"""A canonical view of FX nodes, so one matcher covers every capture method and spelling.

The same computation appears as ``torch.matmul`` / ``operator.matmul`` / ``Tensor.matmul``
(symbolic_trace, dynamo), ``aten.matmul.default`` (torch.export), ``bmm``, ``einsum``; a scale
as ``mul``/``div``/``operator.truediv``; a mask as ``add``/``masked_fill``/``where``. ``canon``
maps a node to a small :class:`Op` record — a kind from a fixed vocabulary plus normalised
operands — or ``None`` when the node is none of them. Matchers are written against kinds only.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Op",
    "canon",
    "node_val",
    "node_shape",
    "is_tensor_node",
    "scalar_value",
    "module_path_of",
    "module_names_of",
    "normalise_module_path",
    "real_users",
    "is_assertion",
    "relink_inplace_uses",
]

aten = torch.ops.aten


def _ov(packet_name: str, *overloads: str) -> set:
    packet = getattr(aten, packet_name, None)
    if packet is None:
        return set()
    return {getattr(packet, o) for o in overloads if hasattr(packet, o)}


# kind -> (torch-level functions, Tensor method names, aten overloads)
_TABLE: dict[str, tuple[set, set, set]] = {
    "matmul": (
        {torch.matmul, operator.matmul, torch.bmm},
        {"matmul", "bmm", "__matmul__"},
        _ov("matmul", "default") | _ov("bmm", "default"),
    ),
    "baddbmm": ({torch.baddbmm}, {"baddbmm"}, _ov("baddbmm", "default")),
    "einsum": ({torch.einsum}, set(), _ov("einsum", "default")),
    "softmax": ({F.softmax, torch.softmax}, {"softmax"}, _ov("softmax", "int") | _ov("_softmax", "default")),
    "mul": ({operator.mul, torch.mul}, {"mul", "__mul__"}, _ov("mul", "Tensor", "Scalar")),
    "div": (
        {operator.truediv, torch.div, torch.true_divide},
        {"div", "__truediv__", "true_divide"},
        _ov("div", "Tensor", "Scalar"),
    ),
    "add": ({operator.add, torch.add}, {"add", "__add__"}, _ov("add", "Tensor", "Scalar")),
    "masked_fill": ({torch.masked_fill}, {"masked_fill"}, _ov("masked_fill", "Scalar", "Tensor")),
    "where": ({torch.where}, set(), _ov("where", "self", "ScalarOther", "ScalarSelf", "Scalar")),
    "tanh": ({torch.tanh}, {"tanh"}, _ov("tanh", "default")),
    "transpose": ({torch.transpose}, {"transpose"}, _ov("transpose", "int")),
    "t": ({torch.t}, {"t"}, _ov("t", "default")),
    "permute": ({torch.permute}, {"permute"}, _ov("permute", "default")),
    # ``flatten`` is a reshape too (``x.unsqueeze(2).expand(...).flatten(1, 2)`` repeats KV heads).
    "reshape": (
        {torch.reshape, torch.flatten},
        {"view", "reshape", "flatten"},
        _ov("view", "default") | _ov("reshape", "default") | _ov("_unsafe_view", "default")
        | _ov("flatten", "using_ints"),
    ),
    "expand": (set(), {"expand"}, _ov("expand", "default")),
    "unsqueeze": ({torch.unsqueeze}, {"unsqueeze"}, _ov("unsqueeze", "default")),
    "repeat_interleave": (
        {torch.repeat_interleave},
        {"repeat_interleave"},
        _ov("repeat_interleave", "self_int"),
    ),
    "dropout": ({F.dropout, torch.dropout}, set(), _ov("dropout", "default")),
    "sdpa": ({F.scaled_dot_product_attention}, set(), _ov("scaled_dot_product_attention", "default")),
    "mha_functional": ({F.multi_head_attention_forward}, set(), set()),
    "sdpa_fused": (
        set(),
        set(),
        _ov("_scaled_dot_product_flash_attention", "default")
        | _ov("_scaled_dot_product_flash_attention_for_cpu", "default")
        | _ov("_scaled_dot_product_efficient_attention", "default")
        | _ov("_scaled_dot_product_cudnn_attention", "default"),
    ),
    # Value-preserving ops a chain may pass through (casts, copies, layout no-ops).
    "identity": (
        {torch.clone},
        {"contiguous", "clone", "float", "half", "bfloat16", "to", "type", "type_as", "detach"},
        _ov("clone", "default")
        | _ov("contiguous", "default")
        | _ov("_to_copy", "default")
        | _ov("to", "dtype", "dtype_layout", "device", "other")
        | _ov("alias", "default")
        | _ov("detach", "default")
        | _ov("lift_fresh_copy", "default"),
    ),
}

# In-place and ``out=`` spellings compute the same value as the out-of-place op (Falcon writes
# ``scores /= sqrt(d)``, ``logits *= inv_norm``), so they share its kind. Matching reads values, not
# aliasing; a site's internal nodes are replaced as a whole, so the mutation goes with them.
_INPLACE: dict[str, tuple[set, set, set]] = {
    "mul": ({operator.imul}, {"mul_", "__imul__"}, _ov("mul_", "Tensor", "Scalar") | _ov("mul", "out")),
    "div": (
        {operator.itruediv},
        {"div_", "__itruediv__"},
        _ov("div_", "Tensor", "Scalar") | _ov("div", "out"),
    ),
    "add": ({operator.iadd}, {"add_", "__iadd__"}, _ov("add_", "Tensor", "Scalar") | _ov("add", "out")),
    "masked_fill": (set(), {"masked_fill_"}, _ov("masked_fill_", "Scalar", "Tensor")),
    "softmax": (set(), set(), _ov("softmax", "int_out") | _ov("_softmax", "out")),
    "baddbmm": (set(), {"baddbmm_"}, _ov("baddbmm_", "default") | _ov("baddbmm", "out")),
}
for _kind, (_fns, _methods, _ovs) in _INPLACE.items():
    _TABLE[_kind][0].update(_fns)
    _TABLE[_kind][1].update(_methods)
    _TABLE[_kind][2].update(_ovs)

_INPLACE_TARGETS = {f for _fns, _m, _ovs in _INPLACE.values() for f in _fns | _ovs}
_INPLACE_METHODS = {m for _f, _ms, _o in _INPLACE.values() for m in _ms}

_BY_TARGET: dict[Any, str] = {}
_BY_METHOD: dict[str, str] = {}
for _kind, (_fns, _methods, _ovs) in _TABLE.items():
    for _f in _fns | _ovs:
        _BY_TARGET[_f] = _kind
    for _m in _methods:
        _BY_METHOD[_m] = _kind
# SDPA is also reachable as the C binding dynamo records.
_BY_TARGET[torch._C._nn.scaled_dot_product_attention] = "sdpa"


@dataclass
class Op:
    """A node seen as a canonical operation: ``kind`` plus its arguments, self first."""

    kind: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    node: fx.Node | None = None

    @property
    def input(self) -> Any:
        return self.args[0] if self.args else None


def _module_kind(gm: fx.GraphModule | None, node: fx.Node) -> str | None:
    if gm is None:
        return None
    try:
        mod = gm.get_submodule(node.target)
    except AttributeError:
        return None
    if isinstance(mod, nn.Softmax):
        return "softmax"
    if isinstance(mod, nn.Dropout):
        return "dropout"
    if isinstance(mod, nn.Identity):
        return "identity"
    return None


def canon(node: Any, gm: fx.GraphModule | None = None) -> Op | None:
    """The canonical :class:`Op` of ``node``, or ``None`` if it is not one we reason about."""
    if not isinstance(node, fx.Node):
        return None
    kind = None
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.op == "call_function":
        kind = _BY_TARGET.get(node.target)
        if kind is None and node.target is operator.getitem:
            kind = _getitem_kind(node)
    elif node.op == "call_method":
        kind = _BY_METHOD.get(node.target)
    elif node.op == "call_module":
        kind = _module_kind(gm, node)
        if kind == "softmax":
            kwargs = {"dim": gm.get_submodule(node.target).dim}
        elif kind == "dropout":
            mod = gm.get_submodule(node.target)
            kwargs = {"p": mod.p, "train": mod.training}
    if kind is None:
        return None
    if kind == "where" and node.op == "call_function" and len(args) == 1:
        return None  # torch.where(cond) returns indices
    return Op(kind, args, kwargs, node)


def _mutates_first_arg(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _INPLACE_METHODS
    return node.op == "call_function" and node.target in _INPLACE_TARGETS and "out" not in node.kwargs


def relink_inplace_uses(gm: fx.GraphModule) -> int:
    """Make later reads of a tensor mutated in place read the in-place op's node instead.

    dynamo records ``s.masked_fill_(m, -inf); softmax(s)`` with the softmax reading ``s``, so
    the mask is invisible to a walk up from the softmax and the mutation looks like an outside
    use of the scores. The in-place op returns its (mutated) first argument, so reading its
    node is the same tensor: the graph computes exactly what it did, now in dataflow form.

    Returns:
        How many uses were relinked (the graph is linted and recompiled when any were).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        base = node.args[0] if node.args else None
        if not isinstance(base, fx.Node) or not _mutates_first_arg(node):
            continue
        for user in list(base.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(base, node)
                changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _getitem_kind(node: fx.Node) -> str | None:
    """``x[:, :, None]`` (dynamo's spelling of unsqueeze) is recognised; other indexing is not."""
    idx = node.args[1] if len(node.args) > 1 else None
    if not isinstance(idx, tuple) or idx.count(None) != 1:
        return None
    if all(i is None or (isinstance(i, slice) and i == slice(None, None, None)) for i in idx):
        return "getitem_unsqueeze"
    return None


def node_val(node: Any) -> Any:
    """The example value (FakeTensor or tensor) FX recorded for ``node``, if any."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if v is not None:
            return v
    tm = node.meta.get("tensor_meta")
    return tm


def node_shape(node: Any) -> tuple[int, ...] | None:
    """Concrete shape of ``node`` from its metadata (symbolic sizes use their hint)."""
    v = node_val(node)
    shape = getattr(v, "shape", None)
    if shape is None:
        return None
    out = []
    for s in shape:
        if isinstance(s, torch.SymInt):
            hint = s.node.hint if hasattr(s.node, "hint") else None
            out.append(int(hint) if hint is not None else -1)
        else:
            out.append(int(s))
    return tuple(out)


def node_dtype(node: Any) -> torch.dtype | None:
    """dtype recorded for ``node``."""
    return getattr(node_val(node), "dtype", None)


def is_tensor_node(node: Any) -> bool:
    """Whether ``node`` produces a tensor (per its metadata; unknown counts as tensor)."""
    if not isinstance(node, fx.Node):
        return False
    v = node_val(node)
    if v is None:
        return True
    return hasattr(v, "shape")


def scalar_value(x: Any) -> float | None:
    """``x`` as a Python float if it is a number (or a 0-dim constant), else ``None``."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        return float(x)
    return None


def module_path_of(node: fx.Node, module_names: Mapping[int, str] | None = None) -> str:
    """Innermost owning module's path, as the model's own ``named_modules()`` names it.

    Resolved by identity where the graph records it: dynamo keys ``nn_module_stack`` entries by
    ``id(module)``, so with ``module_names`` (``id -> name`` of the captured root's modules) the
    name is the model's own, whatever wrapper, argument position or decorator dynamo rooted the
    path at. torch.export's paths are already relative to its root. Otherwise the recorded
    source string is normalised (:func:`normalise_module_path`).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, (path, _type) = list(stack.items())[-1]
    if module_names:
        try:
            name = module_names.get(int(key))
        except (TypeError, ValueError):
            name = None
        if name is not None:
            return name
    return normalise_module_path(path)


#: A dynamo source's root: the traced frame's local (``L['self']``, ``L['args']``, ``L['fn']``)
#: followed by argument subscripts, bound-method and ``functools`` hops (``.__self__``,
#: ``.__wrapped__``, a partial's ``.args[0]`` / ``.keywords['m']``), before the first module attribute.
_SUBSCRIPT = r"\[(?:\d+|'[^']+'|\"[^\"]+\")\]"
_SOURCE_ROOT = re.compile(
    rf"^L{_SUBSCRIPT}(?:{_SUBSCRIPT}|\.__self__|\.__wrapped__|\.func|\.(?:args|keywords){_SUBSCRIPT})*"
)


def normalise_module_path(path: str) -> str:
    """A recorded module path in ``a.b.0.c`` form, for graphs without module identities.

    dynamo writes ``L['self'].model.layers[0]``, ``L['args'][0].model.layers.0`` (a wrapper's
    positional argument, as transformers 5.24's decorated ``forward`` gives),
    ``L['fn'].__self__._modules['model']``; torch.export writes ``model.layers.0``. The root
    expression is dropped whole, then subscripts become dotted names.
    """
    while (unwrapped := re.sub(r"getattr\(([^,()]+), ['\"]([^'\"]+)['\"]\)", r"\1.\2", path)) != path:
        path = unwrapped
    path = _SOURCE_ROOT.sub("", path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    return path.strip(".")


def module_names_of(root: torch.nn.Module) -> dict[int, str]:
    """``id(module) -> name`` for every module of ``root`` (its ``named_modules()``, '' for itself)."""
    return {id(m): name for name, m in root.named_modules(remove_duplicate=False)}


def is_assertion(node: fx.Node) -> bool:
    """Checks torch.export inserts (``_assert_tensor_metadata`` and friends); they compute nothing."""
    name = str(getattr(node.target, "__name__", node.target))
    return node.op == "call_function" and name.startswith(("_assert", "aten._assert", "sym_constrain"))


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that compute something (assertion nodes left out)."""
    return [u for u in node.users if not is_assertion(u)]
