"""MLIR of an optimised model: its ``torch.export`` program through torch-mlir's FX importer.

:func:`export_mlir` hands the program of :func:`~attnopt.rewriter.torch_export.export` to
torch-mlir's FX importer with torch-mlir's decompositions less those of SDPA, and lowers it to
the torch backend contract with a small library giving the ``attnopt`` ops' shapes and dtypes:
exact sites stay ``torch.aten.scaled_dot_product_attention`` and the others appear as
``torch.operator "torch.attnopt.<family>"``. torch-mlir is an optional extra, imported only here.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from attnopt.codegen.ops import FAMILY_OPS as _FAMILY_OPS
from attnopt.rewriter.torch_export import export

__all__ = ["export_mlir", "mlir_op_library", "MLIR_OUTPUT_TYPES"]

#: ``output_type`` values torch-mlir's ``export_and_import`` accepts.
MLIR_OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors", "tosa", "stablehlo")

_LEGAL_OPS = ("aten.scaled_dot_product_attention",) + tuple(f"torch.attnopt.{f}" for f in _FAMILY_OPS)

_SDPA_OPS = (
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_attention_math",
)

# torch-mlir keeps a custom op through its backend lowering only when an "extra library" gives
# the op's value semantics, result shape and result dtype (as torch-dialect functions named by
# the op). Every attnopt op has the same schema: output (*q.shape[:-1], v.shape[-1]), v's dtype.
_LIBRARY_TEMPLATE = """
func.func @"__torch_mlir_shape_fn.{name}"(%q: !torch.list<int>, %k: !torch.list<int>, %v: !torch.list<int>,
    %m: !torch.optional<list<int>>, %p: !torch.list<list<int>>, %s: !torch.float, %c: !torch.bool,
    %cfg: !torch.str) -> !torch.list<int> {{
  %c0 = torch.constant.int 0
  %cm1 = torch.constant.int -1
  %c1 = torch.constant.int 1
  %head = torch.aten.slice.t %q, %c0, %cm1, %c1 : !torch.list<int>, !torch.int, !torch.int, !torch.int -> !torch.list<int>
  %dv = torch.aten.__getitem__.t %v, %cm1 : !torch.list<int>, !torch.int -> !torch.int
  %tail = torch.prim.ListConstruct %dv : (!torch.int) -> !torch.list<int>
  %out = torch.aten.add.t %head, %tail : !torch.list<int>, !torch.list<int> -> !torch.list<int>
  return %out : !torch.list<int>
}}
func.func @"__torch_mlir_dtype_fn.{name}"(%q: !torch.tuple<int, int>, %k: !torch.tuple<int, int>,
    %v: !torch.tuple<int, int>, %m: !torch.optional<tuple<int, int>>, %p: !torch.list<tuple<int, int>>,
    %s: !torch.float, %c: !torch.bool, %cfg: !torch.str) -> !torch.int {{
  %0:2 = torch.prim.TupleUnpack %v : !torch.tuple<int, int> -> !torch.int, !torch.int
  return %0#1 : !torch.int
}}
func.func @"__torch_mlir_has_value_semantics_fn.{name}"() {{ return }}
"""


def mlir_op_library() -> str:
    """torch-mlir's extra library (shape, dtype, value semantics) for every ``attnopt`` op."""
    return "".join(_LIBRARY_TEMPLATE.format(name=f"torch.attnopt.{f}") for f in _FAMILY_OPS)


#: Output types whose lowering has a conversion for SDPA; for the others it is decomposed.
_KEEPS_SDPA = ("raw", "torch", "linalg-on-tensors")


def _decompositions(keep_sdpa: bool) -> dict:
    """torch-mlir's own decompositions, less the ones that would break SDPA apart."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = get_decomposition_table()
    if not keep_sdpa:
        return table
    return {op: fn for op, fn in table.items() if op.name().split("::")[-1].split(".")[0] not in _SDPA_OPS}


def _lower(mlir_fx, module, output_type: str):
    """torch-mlir's lowering of an imported module, with the attnopt ops' library."""
    import tempfile

    legal = [op for op in _LEGAL_OPS if output_type in _KEEPS_SDPA or "scaled_dot" not in op]

    with tempfile.TemporaryDirectory(prefix="attnopt_mlir_") as tmp:
        lib = pathlib.Path(tmp) / "attnopt_ops.mlir"
        lib.write_text(mlir_op_library())
        options = mlir_fx.FxImportOptions(extra_library_file_name=str(lib), backend_legal_ops=legal)
        return mlir_fx._module_lowering(
            False, False, mlir_fx.OutputType.get(output_type), module, fx_import_options=options
        )


def _import_torch_mlir():
    try:
        from torch_mlir import fx as mlir_fx
    except ImportError as e:
        raise ImportError(
            "attnopt.export_mlir needs torch-mlir, which is an optional extra: pip install attnopt[mlir]"
        ) from e
    return mlir_fx


def export_mlir(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example: Any = None,
    path: str | os.PathLike | None = None,
    output_type: str = "torch",
    *,
    check: bool = True,
) -> str:
    """Write the optimised model as MLIR (torch dialect by default); returns the MLIR text.

    Exact sites stay ``torch.aten.scaled_dot_product_attention`` (where SDPA means the same; see
    :func:`exact_to_sdpa`; for ``"tosa"`` and ``"stablehlo"``, which cannot lower SDPA, they are
    decomposed into matmuls and softmax); every other site is a ``torch.operator "torch.attnopt.<family>"``
    whose operands are q, k, v, the mask, the fitted tensors, scale, is_causal and the site's
    config JSON.

    Args:
        model: a model returned by :func:`attnopt.optimize` or :func:`attnopt.apply`, or a
            program from :func:`export` (then ``example`` is not needed; make it with
            ``exact_as_sdpa=True`` for SDPA at exact sites).
        example: one example call: a tuple of positional args, a dict of keyword args (or a
            tensor, or an ``(args, kwargs)`` pair).
        path: file to write (parent directories are created); None writes nothing.
        output_type: one of :data:`MLIR_OUTPUT_TYPES`: ``"raw"`` is the importer's output,
            ``"torch"`` the torch backend contract; lowerings past it (linalg-on-tensors, tosa,
            stablehlo) have no conversion for the ``attnopt`` operators and fail unless every
            site is exact.
        check: compare the exported program with the model first (see :func:`export`).

    Raises:
        ImportError: torch-mlir is not installed (``pip install attnopt[mlir]``).
        ValueError: an unknown ``output_type``.

    Example::

        >>> text = attnopt.export_mlir(model, {"input_ids": ids, "use_cache": False}, "model.mlir")
        >>> re.findall(r'torch.operator "[^"]+"|torch.aten.scaled_dot_product_attention', text)
        ['torch.aten.scaled_dot_product_attention', 'torch.operator "torch.attnopt.quantized"']
    """
    if output_type not in MLIR_OUTPUT_TYPES:
        raise ValueError(f"Expected output_type in {MLIR_OUTPUT_TYPES}, but got {output_type!r}.")
    mlir_fx = _import_torch_mlir()
    keep_sdpa = output_type in _KEEPS_SDPA
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        program = export(model, example, check=check, exact_as_sdpa=True)
    # The frozen importer looks buffers up in state_dict, where non-persistent ones (rotary
    # inv_freq, position_ids) and the fitted tensors are missing, and it cannot import a list of
    # frozen tensors (the ops' params). The program importer handles both; with nothing mutated
    # at inference, every weight and buffer still becomes a literal and the function takes only
    # the model's inputs.
    module = mlir_fx.export_and_import(
        program,
        output_type="raw",
        decomposition_table=_decompositions(keep_sdpa),
        experimental_support_mutation=True,
    )
    if output_type != "raw":
        module = _lower(mlir_fx, module, output_type)
    text = str(module)
    if path is not None:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return text
