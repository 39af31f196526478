"""Exporting an optimised model: ``torch.export`` programs and MLIR that name each site's variant.

The work lives in :mod:`~attnopt.rewriter.torch_export` (the program) and
:mod:`~attnopt.rewriter.mlir` (its MLIR); this module gathers their public names.
"""

from attnopt.rewriter.mlir import MLIR_OUTPUT_TYPES, export_mlir, mlir_op_library
from attnopt.rewriter.torch_export import (
    DEFAULT_TOLERANCE,
    ExportCheckError,
    attnopt_nodes,
    exact_to_sdpa,
    export,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "ExportCheckError",
    "MLIR_OUTPUT_TYPES",
    "attnopt_nodes",
    "exact_to_sdpa",
    "export",
    "export_mlir",
    "mlir_op_library",
]
