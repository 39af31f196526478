"""attnopt.codegen: the ``attnopt::*`` operators and the kernels behind them (CPU and Triton)."""

import importlib

from attnopt.codegen import ops  # noqa: F401  (defines the operators)

# CPU kernels register themselves on import; a family still being written is simply absent.
for _name in ("block_sparse", "quantized", "linear", "shared"):
    try:
        importlib.import_module(f"attnopt.codegen.cpu.{_name}")
    except ModuleNotFoundError as _e:
        if not (_e.name or "").startswith("attnopt."):
            raise
