"""The exact Triton sources a plan runs, written to disk beside the plan.

A plan is data, but a reader (or a later attnopt version) should still see which kernels ran:
every host wrapper of this package calls :func:`record_launch` with its ``@triton.jit`` kernel
and the constexpr specialisation it launched; :func:`write_sources` then writes one file per
specialisation: a header (kernel name, constexpr values, autotune choice when known, triton and
torch versions) followed by ``inspect.getsource`` of the kernel and of every ``@triton.jit``
helper it calls, transitively. File names carry a hash of that text, so they are stable across
runs and identical kernels are written once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import pathlib
from typing import Any

import torch
import triton

from attnopt.codegen.memo import BoundedCache

__all__ = ["LAUNCHED", "clear_launches", "kernel_source", "record_launch", "write_sources"]

#: (kernel name, sorted constexpr items) -> (kernel object, constexprs); filled by the wrappers.
#: Bounded: a serving process that sees ever new shapes keeps the most recent specialisations.
LAUNCHED: BoundedCache[tuple[str, tuple], tuple[Any, dict[str, Any]]] = BoundedCache("triton.launches", 1024)


def _is_jit(obj: Any) -> bool:
    """A ``@triton.jit`` function, compiled (``JITFunction``) or interpreted (``InterpretedFunction``)."""
    return isinstance(obj, triton.runtime.KernelInterface) and inspect.isfunction(getattr(obj, "fn", None))


def _jit_function(kernel: Any) -> Any:
    """Unwrap an ``Autotuner``/``Heuristics`` to the jit function underneath."""
    while not _is_jit(kernel):
        inner = getattr(kernel, "fn", None)
        if inner is None or inspect.isfunction(kernel):
            raise TypeError(
                f"Expected a @triton.jit kernel (possibly autotuned), but got {type(kernel).__name__}."
            )
        kernel = inner
    return kernel


def _helpers(fn: Any) -> list[Any]:
    """``@triton.jit`` functions ``fn`` calls, transitively, in first-use order."""
    seen: dict[str, Any] = {}
    stack = [fn]
    while stack:
        cur = stack.pop()
        glb = cur.fn.__globals__
        for name in cur.fn.__code__.co_names:
            obj = glb.get(name)
            if _is_jit(obj) and obj is not fn and name not in seen:
                seen[name] = obj
                stack.append(obj)
    return list(seen.values())


def kernel_source(kernel: Any, constexprs: dict[str, Any], best_config: str | None = None) -> str:
    """Header (specialisation, versions) plus the source of the kernel and its jit helpers."""
    fn = _jit_function(kernel)
    lines = [
        f"# attnopt generated kernel: {fn.fn.__module__}.{fn.fn.__name__}",
        f"# triton {triton.__version__}, torch {torch.__version__}",
        "# constexpr specialisation:",
        *(f"#   {k} = {v!r}" for k, v in sorted(constexprs.items())),
    ]
    if best_config:
        lines.append(f"# autotune choice: {best_config}")
    body = [inspect.getsource(h.fn) for h in _helpers(fn)] + [inspect.getsource(fn.fn)]
    return "\n".join(lines) + "\n\nimport triton\nimport triton.language as tl\n\n\n" + "\n\n".join(body)


def record_launch(kernel: Any, constexprs: dict[str, Any]) -> None:
    """Remember that ``kernel`` ran with ``constexprs`` (cheap: a dict insert per new specialisation)."""
    key = (_jit_function(kernel).fn.__name__, tuple(sorted(constexprs.items())))
    if key not in LAUNCHED:
        LAUNCHED[key] = (kernel, dict(constexprs))


def clear_launches() -> None:
    """Forget recorded launches (e.g. before running one plan, to save only its kernels)."""
    LAUNCHED.clear()


def write_sources(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Write every recorded specialisation to ``directory``; return the file paths (sorted).

    Files are named ``<kernel>-<hash12>.py``; an ``index.json`` lists kernel, constexprs and file.
    """
    out_dir = pathlib.Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    paths = []
    items = LAUNCHED.items()
    for (name, _), (kernel, constexprs) in items:
        best = getattr(kernel, "best_config", None)
        text = kernel_source(kernel, constexprs, str(best) if best is not None else None)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        path = out_dir / f"{name.lstrip('_')}-{digest}.py"
        path.write_text(text)
        paths.append(path)
        index.append({"kernel": name, "constexprs": constexprs, "file": path.name})
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True, default=str))
    return sorted(paths)
