"""attnopt.codegen: the ``attnopt::*`` operators and the kernels behind them (CPU and Triton).

CPU kernels register on import. Triton kernels register for ``"cuda"`` when a CUDA device is
present (importing them is safe without one, and the test suite imports them under the Triton
interpreter); without CUDA nothing Triton-related is imported, so CPU-only machines never hit
a Triton import error. :func:`load_kernels` is the one loader: this package calls it on import,
the cost model's profiler calls it for the device it measures.
"""

import importlib
import logging

import torch

from attnopt.codegen import head_pruned as _head_pruned  # noqa: F401  (the head-pruning emulation)
from attnopt.codegen import ops  # noqa: F401  (defines the operators)

__all__ = ["KERNEL_FAMILIES", "load_kernels"]

#: Families with kernel modules of their own under ``cpu/`` and ``triton/``.
KERNEL_FAMILIES = ("block_sparse", "quantized", "linear", "shared")

_log = logging.getLogger("attnopt")
_LOADED: set[str] = set()


def load_kernels(device_type: str = "cpu") -> None:
    """Register the kernels for ``device_type`` (``"cpu"``, or ``"cuda"``: CPU and Triton); idempotent.

    A family whose module is absent from this build is skipped. CPU kernels are the portable
    path, so any other error importing them is raised; Triton kernels that fail to import (e.g.
    triton missing on a CUDA machine) are logged once and the portable paths serve instead.
    """
    packages = ["attnopt.codegen.cpu"] + (["attnopt.codegen.triton"] if device_type == "cuda" else [])
    for package in packages:
        if package in _LOADED:
            continue
        _LOADED.add(package)
        try:
            for name in KERNEL_FAMILIES:
                try:
                    importlib.import_module(f"{package}.{name}")
                except ModuleNotFoundError as e:  # a family absent from this build
                    if not (e.name or "").startswith("attnopt."):
                        raise
        except ImportError as e:
            if package == "attnopt.codegen.cpu":
                raise
            _log.warning("Triton kernels unavailable (%s); attnopt uses its portable paths", e)


load_kernels("cuda" if torch.cuda.is_available() else "cpu")
