"""Ahead-of-time compilation of this package's Triton kernels for GPUs that are not there.

attnopt promises that every kernel compiles for NVIDIA sm_80, sm_90 and sm_100, and CI has no GPU;
this module checks that promise with Triton's own compiler, which needs no driver when it is given
a target: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
cc, 32))`` runs the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, then ``ptxas``) on the CPU.

The pieces, in the order a check uses them:

* :func:`discover_kernels`: every ``@triton.jit`` function defined in a submodule of
  :mod:`attnopt.codegen.triton`, split into *entry kernels* (launched by a host wrapper; no other
  jit function calls them) and the device helpers they call.
* :func:`capture_launch`: call a host wrapper (``quantized_attention``, ...) on ``meta`` tensors with
  every kernel of the package replaced by a recorder, so the arguments and constexprs an AOT
  compile uses are exactly the ones that wrapper passes (its dtypes, strides, BLOCK sizes, flags).
* :func:`specialise`: turn a recorded launch into ``ASTSource`` inputs the way Triton's JIT does at
  run time (``int == 1`` becomes a constexpr, 16-divisible ints and 16-byte-aligned pointers get
  ``tt.divisibility``), with the kernel's first autotune config as compile options.
* :func:`compile_case`: compile one case (see :mod:`.aot_cases`) for one compute capability and
  read what ``ptxas -v`` says about it: registers, spill bytes, stack, plus shared memory from the
  compiled metadata.

The kernels must be real ``JITFunction`` objects, so compiling needs ``TRITON_INTERPRET`` unset
when the kernel modules are first imported; a test process running under the interpreter uses
:func:`main` in a subprocess (``python -m attnopt.codegen.triton.aot``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import triton

from attnopt.codegen.triton import source
from attnopt.codegen.triton._common import is_interpreting
from attnopt.codegen.triton.aot_cases import CASES, TARGETS

__all__ = [
    "AotResult",
    "CompileSpec",
    "Launch",
    "capture_launch",
    "compile_case",
    "discover_kernels",
    "main",
    "specialise",
]

PACKAGE = "attnopt.codegen.triton"


# ------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------


def _jit_of(obj: Any) -> Any | None:
    """The jit function under ``obj`` (a ``JITFunction``/``InterpretedFunction``, possibly autotuned), or None."""
    if not isinstance(obj, triton.runtime.KernelInterface):
        return None
    try:
        return source._jit_function(obj)
    except TypeError:
        return None


def _package_modules() -> list[Any]:
    """Every submodule of :mod:`attnopt.codegen.triton`, imported."""
    package = importlib.import_module(PACKAGE)
    return [importlib.import_module(f"{PACKAGE}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def discover_kernels() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(kernels, helpers)``: the package's ``@triton.jit`` functions, keyed ``"<module>.<name>"``.

    Found by scanning module attributes (a function counts where it is defined, not where it is
    imported). A *kernel* is one no other jit function of the package calls (so a host wrapper
    launches it); a *helper* is called by at least one. The values are the module attributes (an
    ``Autotuner`` for autotuned kernels).
    """
    found: dict[str, Any] = {}
    for module in _package_modules():
        for name, obj in vars(module).items():
            jit = _jit_of(obj)
            if jit is not None and jit.fn.__module__ == module.__name__ and jit.fn.__name__ == name:
                found[f"{module.__name__.rsplit('.', 1)[1]}.{name}"] = obj
    called = {id(h) for obj in found.values() for h in source._helpers(_jit_of(obj))}
    kernels = {k: v for k, v in found.items() if id(_jit_of(v)) not in called}
    helpers = {k: v for k, v in found.items() if id(_jit_of(v)) in called}
    return kernels, helpers


def helpers_of(kernel: Any) -> set[str]:
    """Names of the jit helpers ``kernel`` calls, transitively."""
    return {h.fn.__name__ for h in source._helpers(_jit_of(kernel))}


# ------------------------------------------------------------------------------------------
# Capturing what a host wrapper launches
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a host wrapper made it: the kernel (module attribute) and its arguments."""

    kernel: str
    target: Any
    args: tuple
    kwargs: dict[str, Any]


class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, name: str, kernel: Any, sink: list[Launch]) -> None:
        self.fn = kernel  # what source.record_launch unwraps
        self._name, self._kernel, self._sink = name, kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self._sink.append(Launch(self._name, self._kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(patches: dict[tuple[Any, str], Any]) -> Iterator[list[Launch]]:
    """Replace every package kernel by a :class:`_Recorder` (plus ``patches``) and yield the launches."""
    kernels, _ = discover_kernels()
    launches: list[Launch] = []
    replaced: dict[tuple[Any, str], Any] = {}
    for key, obj in kernels.items():
        module = importlib.import_module(f"{PACKAGE}.{key.split('.')[0]}")
        name = key.split(".", 1)[1]
        replaced[(module, name)] = obj
        setattr(module, name, _Recorder(key, obj, launches))
    replaced[(source, "record_launch")] = source.record_launch
    source.record_launch = lambda kernel, constexprs: None
    for (owner, name), value in patches.items():
        replaced[(owner, name)] = getattr(owner, name)
        setattr(owner, name, value)
    try:
        yield launches
    finally:
        for (owner, name), value in replaced.items():
            setattr(owner, name, value)


def capture_launch(
    call: Callable[[], Any], kernel: str, patches: dict[tuple[Any, str], Any] | None = None
) -> Launch:
    """The launch of ``kernel`` (``"<module>.<name>"``) that ``call()`` makes; exactly one is expected.

    ``call`` runs a host wrapper, normally on ``meta`` tensors (shapes, dtypes and strides without
    memory); every package kernel is recorded, not run, while it does. ``patches`` maps
    ``(object, attribute)`` to a temporary value (e.g. a device capability check that a ``meta``
    tensor cannot answer).

    Raises:
        ValueError: when ``call`` launches ``kernel`` zero or several times.
    """
    with _recording(patches or {}) as launches:
        call()
    mine = [x for x in launches if x.kernel == kernel]
    if len(mine) != 1:
        raise ValueError(
            f"Expected the call to launch {kernel} once, but it launched {[x.kernel for x in launches]}. "
            "Point the case at the wrapper that launches this kernel."
        )
    return mine[0]


# ------------------------------------------------------------------------------------------
# Specialisation: what Triton's JIT would hand the compiler
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """``ASTSource`` inputs and compile options of one launch."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, Any]

    def describe(self) -> str:
        """The constexprs and options in one line (reports, test failures)."""
        skip = ("HEAD_DIM_V", "BLOCK_DV")
        items = [f"{k}={v}" for k, v in self.constexprs.items() if k.isupper() and k not in skip]
        return " ".join(items)


def specialise(launch: Launch) -> CompileSpec:
    """The signature, constexprs, attributes and options Triton's JIT would derive from ``launch``.

    Follows ``JITFunction.run``: each non-constexpr argument goes through the CUDA backend's
    ``specialize_impl`` (pointer dtype, ``i32``/``i64``/``fp32``; ints equal to 1 become constexprs;
    16-divisible ints and 16-byte-aligned tensors get ``tt.divisibility`` 16). Options are the
    kernel's first autotune config (the one the interpreter tests run), else Triton's defaults.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    jit = _jit_of(launch.target)
    if not isinstance(jit, triton.runtime.JITFunction):
        raise RuntimeError(
            f"Expected {launch.kernel} as a compiled JITFunction, but got {type(jit).__name__}. "
            "Import the kernels with TRITON_INTERPRET unset (python -m attnopt.codegen.triton.aot)."
        )
    configs = getattr(launch.target, "configs", None)
    config = configs[0].all_kwargs() if configs else {}
    meta = {k: v for k, v in config.items() if k in jit.arg_names}  # a config's constexprs (none today)
    bound = jit.signature.bind(*launch.args, **launch.kwargs, **meta)
    bound.apply_defaults()
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(jit.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(
            CUDABackend, value, param.is_const, not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )  # fmt: skip
        if kind == "constexpr":
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = kind
            if attr:
                attrs[(i,)] = CUDABackend.parse_attr(attr)
    options = {k: v for k, v in config.items() if k not in jit.arg_names}
    return CompileSpec(launch.kernel, signature, constexprs, attrs, options)


# ------------------------------------------------------------------------------------------
# Compiling and reading ptxas' report
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AotResult:
    """One (case, target) compile: status ``ok`` / ``failed`` / ``skipped``, resource use when ok.

    ``registers``, ``spill_stores``, ``spill_loads`` and ``stack`` (bytes) come from ``ptxas -v``;
    ``shared`` (bytes) from the compiled kernel's metadata; ``seconds`` is the whole compile.
    """

    case: str
    kernel: str
    target: int
    status: str
    spec: str = ""
    error: str | None = None
    seconds: float | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    cubin_bytes: int | None = None
    ptx_target: str | None = None
    num_warps: int | None = None
    num_stages: int | None = None


_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str, name: str) -> dict[str, int] | None:
    """Registers, spills and stack of entry function ``name`` from ``ptxas -v`` output, or None."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        return None
    regs, frame = _REGS.search(log, start), _FRAME.search(log, start)
    if regs is None or frame is None:
        return None
    stack, stores, loads = (int(x) for x in frame.groups())
    return {"registers": int(regs.group(1)), "spill_stores": stores, "spill_loads": loads, "stack": stack}


def _ptxas_rerun(ptx: str, cc: int) -> str:
    """``ptxas -v`` of ``ptx`` for ``cc`` with the binary Triton uses (when its log was not seen)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/k.ptx"
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [
            get_ptxas(cc).path,
            "-v",
            f"--gpu-name={sm_arch_from_capability(cc)}",
            path,
            "-o",
            f"{tmp}/k.o",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_spec(spec: CompileSpec, jit: Any, cc: int) -> tuple[Any, dict[str, int]]:
    """``triton.compile`` of ``spec`` for ``sm_<cc>``; returns the compiled kernel and ptxas' numbers."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=jit, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec.options))
    usage = parse_ptxas_log(log.getvalue(), jit.fn.__name__)
    if usage is None:  # a cache hit: ptxas did not run, so ask it again
        usage = parse_ptxas_log(_ptxas_rerun(compiled.asm["ptx"], cc), jit.fn.__name__) or {}
    return compiled, usage


def _error_text(e: BaseException) -> str:
    """The exception and its causes, innermost last (Triton wraps the real message in source excerpts)."""
    parts = [f"{type(e).__name__}: {e}"]
    while (e := e.__cause__ or e.__context__) is not None and len(parts) < 8:
        parts.append(f"caused by {type(e).__name__}: {e}")
    return "\n".join(parts)


def compile_case(case: Any, cc: int) -> AotResult:
    """Compile one :class:`~attnopt.codegen.triton.aot_cases.AotCase` for ``sm_<cc>``; never raises.

    Skips with the case's reason where it declares one for ``cc``; a failure carries the
    compiler's message (``error``), which tests report verbatim.
    """
    result = AotResult(case.name, case.kernel, cc, "skipped")
    if cc in case.skip:
        result.error = case.skip[cc]
        return result
    try:
        launch = capture_launch(case.launch, case.kernel, case.patches())
        spec = specialise(launch)
        result.spec = spec.describe()
        t0 = time.perf_counter()
        compiled, usage = compile_spec(spec, _jit_of(launch.target), cc)
        result.seconds = round(time.perf_counter() - t0, 3)
    except Exception as e:  # noqa: BLE001 - reported, not hidden: tests fail on it
        result.status, result.error = "failed", _error_text(e)
        return result
    cubin = compiled.asm.get("cubin", b"")
    match = re.search(r"^\.target\s+(\S+)", compiled.asm.get("ptx", ""), re.MULTILINE)
    result.status = "ok" if cubin[:4] == b"\x7fELF" else "failed"
    if result.status == "failed":
        result.error = f"no cubin produced (asm keys {sorted(compiled.asm)})"
    result.cubin_bytes, result.shared = len(cubin), int(compiled.metadata.shared)
    result.num_warps, result.num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    result.ptx_target = match.group(1) if match else None
    for key, value in usage.items():
        setattr(result, key, value)
    return result


def run_cases(
    cases: list[Any], targets: tuple[int, ...], on_result: Callable[[AotResult], None] | None = None
) -> list[AotResult]:
    """Compile every case for every target, in a fresh Triton cache (so ptxas really runs).

    ``on_result`` sees each result as it comes (progress output).
    """
    results = []
    with tempfile.TemporaryDirectory(prefix="attnopt-aot-") as cache, triton.knobs.cache.scope():
        triton.knobs.cache.dir = cache
        for cc in targets:
            for case in cases:
                results.append(compile_case(case, cc))
                if on_result is not None:
                    on_result(results[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m attnopt.codegen.triton.aot [--targets 80,90] [--cases a,b] [--json PATH]``.

    Compiles the named cases of :data:`~attnopt.codegen.triton.aot_cases.CASES` (all by default)
    and writes the :class:`AotResult` list as JSON to ``PATH`` (stdout without one). Exit status 0
    unless a case failed.
    """
    parser = argparse.ArgumentParser(prog="python -m attnopt.codegen.triton.aot", description=main.__doc__)
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--json", default="", help="output file (default: stdout)")
    args = parser.parse_args(argv)
    if is_interpreting():
        parser.error("TRITON_INTERPRET is set: the kernels are interpreted functions; unset it to compile")
    wanted = [n for n in args.cases.split(",") if n]
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(by_name)}")
    cases = [by_name[n] for n in wanted] if wanted else list(CASES)
    results = run_cases(cases, tuple(int(t) for t in args.targets.split(",")))
    text = json.dumps([dataclasses.asdict(r) for r in results], indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return int(any(r.status == "failed" for r in results))


if __name__ == "__main__":
    sys.exit(main())
