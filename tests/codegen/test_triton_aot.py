"""Every Triton kernel compiles ahead of time for sm_80, sm_90 and sm_100, with no GPU present.

The kernels are found by scanning :mod:`attnopt.codegen.triton`'s modules for ``@triton.jit``
functions (:func:`attnopt.codegen.triton.aot.discover_kernels`); every entry kernel needs a case
in :data:`attnopt.codegen.triton.aot_cases.CASES`, so a new kernel without one fails here. A case
calls the kernel's host wrapper on ``meta`` tensors and compiles exactly what the wrapper launches
(signature, constexprs, Triton's run-time specialisation) with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``, the first autotune config as options.

Matrix: compiling all cases for all three targets takes about 200 s on one core, so sm_90 gets
every case and sm_80 / sm_100 the ``representative`` subset (one or more per kernel, every
``QK_MODE`` of the dense kernel; about 55 s wall in two worker processes).
``benchmarks/triton_aot.py`` compiles the full matrix and records registers and spills.

What is asserted: the compile succeeds and yields a cubin (ELF) for ``sm_<cc>``; ptxas reported
a register count; the kernel's shared memory fits the target's per-block limit. Spills are *not*
asserted: several kernels spill today with their first autotune config (the shared-score kernel
at D=128 with 4 members, int8 dense at 128x64 tiles, causal linear attention); the benchmark's
table records the numbers. FP8 cases skip sm_80, as the wrappers do below sm89.

The test process runs kernels under ``TRITON_INTERPRET=1`` (see ``conftest.py``), so the kernels
it imported are interpreted functions; the compiles run in subprocesses
(``python -m attnopt.codegen.triton.aot``) that import them without the interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from attnopt.codegen.triton import aot
from attnopt.codegen.triton.aot_cases import BRANCHES, CASES, TARGETS, branch_value

ROOT = pathlib.Path(__file__).resolve().parents[2]
FULL_TARGET = 90
#: Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 and B200 227 KiB.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}

MATRIX = [(cc, case) for cc in TARGETS for case in CASES if cc == FULL_TARGET or case.representative]


# ------------------------------------------------------------------------------------------
# The case list covers the package (cheap, in-process)
# ------------------------------------------------------------------------------------------


def test_discovery_finds_the_kernels_and_their_helpers():
    kernels, helpers = aot.discover_kernels()
    assert {k.split(".")[0] for k in kernels} >= {"block_sparse", "quantized", "linear", "shared"}
    assert {"_common.attn_tile", "_common.structural_allowed", "_common.load_q"} <= set(helpers)
    assert not set(kernels) & set(helpers)


def test_every_kernel_has_a_compile_case():
    kernels, helpers = aot.discover_kernels()
    covered = {c.kernel for c in CASES}
    missing = sorted(set(kernels) - covered)
    assert not missing, (
        f"Expected an AOT compile case for every Triton kernel, but {missing} have none. Add cases to "
        "attnopt/codegen/triton/aot_cases.py (CASES and BRANCHES) that call the kernel's host wrapper."
    )
    assert covered <= set(kernels), (
        f"cases name kernels that no longer exist: {sorted(covered - set(kernels))}"
    )
    assert set(BRANCHES) == set(kernels), "BRANCHES should list every kernel"
    reached = set().union(*(aot.helpers_of(kernels[k]) for k in covered))
    unreached = sorted(h for h in helpers if h.split(".", 1)[1] not in reached)
    assert not unreached, f"helpers no compiled kernel calls: {unreached}"


def test_case_names_are_unique_and_every_kernel_has_a_representative():
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.kernel for c in CASES if c.representative} == {c.kernel for c in CASES}


@pytest.fixture(scope="module")
def launches():
    """Each case's captured launch (recorded, not run: meta tensors, no compile)."""
    return {c.name: aot.capture_launch(c.launch, c.kernel, c.patches()) for c in CASES}


def test_cases_cover_every_constexpr_branch_and_input_dtype(launches):
    for kernel, flags in BRANCHES.items():
        mine = [launches[c.name] for c in CASES if c.kernel == kernel]
        for flag, expected in flags.items():
            seen = {branch_value(flag, x.kwargs[flag]) for x in mine}
            assert seen == expected, (
                f"{kernel}: {flag} takes {sorted(seen)} in the cases, expected {sorted(expected)}"
            )
        dtypes = {a.dtype for x in mine for a in x.args if isinstance(a, torch.Tensor)}
        assert {torch.float16, torch.bfloat16, torch.float32} <= dtypes, f"{kernel}: inputs {dtypes}"


def test_capture_rejects_a_case_that_does_not_launch_its_kernel():
    case = next(c for c in CASES if c.kernel == "quantized._quantize_blocks_fwd")
    with pytest.raises(ValueError, match="launch linear._linear_fwd once"):
        aot.capture_launch(case.launch, "linear._linear_fwd")


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n"
    )
    assert aot.parse_ptxas_log(log, "k") == {
        "registers": 255,
        "spill_stores": 4,
        "spill_loads": 12,
        "stack": 8,
    }
    assert aot.parse_ptxas_log(log, "other") is None


# ------------------------------------------------------------------------------------------
# The compiles (two subprocesses: sm_90 in full, sm_80 + sm_100 representative)
# ------------------------------------------------------------------------------------------


def _worker(targets: str, cases: list[str] | None, out: pathlib.Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "attnopt.codegen.triton.aot", "--targets", targets, "--json", str(out)]
    if cases:
        cmd += ["--cases", ",".join(cases)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``{(case name, cc): result dict}`` for the whole matrix."""
    tmp = tmp_path_factory.mktemp("aot")
    others = ",".join(str(cc) for cc in TARGETS if cc != FULL_TARGET)
    jobs = [
        (tmp / "full.json", _worker(str(FULL_TARGET), None, tmp / "full.json")),
        (tmp / "rep.json", _worker(others, [c.name for c in CASES if c.representative], tmp / "rep.json")),
    ]
    results = {}
    for path, proc in jobs:
        log, _ = proc.communicate(timeout=1200)
        if not path.exists():
            pytest.fail(f"AOT worker {proc.args} crashed (exit {proc.returncode}):\n{log[-4000:]}")
        results.update({(r["case"], r["target"]): r for r in json.loads(path.read_text())})
    return results


@pytest.mark.slow
@pytest.mark.parametrize(("cc", "case"), MATRIX, ids=[f"sm{cc}-{case.name}" for cc, case in MATRIX])
def test_kernel_compiles_for_target(cc, case, compiled):
    r = compiled[(case.name, cc)]
    if r["status"] == "skipped":
        pytest.skip(r["error"])
    if cc in case.xfail:
        assert r["status"] == "failed" and case.xfail[cc] in r["error"], f"expected to fail, got {r}"
        pytest.xfail(case.xfail[cc])
    assert r["status"] == "ok", f"{case.name} for sm_{cc} ({r['spec']}) failed to compile:\n{r['error']}"
    assert r["cubin_bytes"] > 0 and r["ptx_target"] == f"sm_{cc}" + ("a" if cc >= 90 else "")
    assert r["registers"] is not None and 0 < r["registers"] <= 255, r
    assert r["shared"] <= MAX_SHARED[cc], f"{case.name}: {r['shared']} bytes of shared memory on sm_{cc}"
