"""attnopt.codegen: the ``attnopt::*`` operators and the kernels behind them (CPU and Triton).

CPU kernels register on import. Triton kernels register for ``"cuda"`` when a CUDA device is
present (importing them is safe without one, and the test suite imports them under the Triton
interpreter); without CUDA nothing Triton-related is imported, so CPU-only machines never hit
a Triton import error.
"""

import importlib
import logging

import torch

from attnopt.codegen import ops  # noqa: F401  (defines the operators)

_KERNEL_FAMILIES = ("block_sparse", "quantized", "linear", "shared")


def _import_kernels(package: str) -> None:
    for name in _KERNEL_FAMILIES:
        try:
            importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:  # a family absent from this build
            if not (e.name or "").startswith("attnopt."):
                raise


_import_kernels("attnopt.codegen.cpu")
if torch.cuda.is_available():
    try:
        _import_kernels("attnopt.codegen.triton")
    except ImportError as _e:  # e.g. triton missing on a CUDA machine: CPU paths serve instead
        logging.getLogger("attnopt").warning("Triton kernels unavailable (%s); attnopt uses its portable paths", _e)
