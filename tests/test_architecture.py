"""The package's shape, checked: imports flow one way through the rooms, and modules stay small.

The rooms and their order are DESIGN.md's data flow (see the README's Layout section):

    api → pipeline → {calibration, cost_model, rewriter} → codegen → replacements → patterns

A room imports only rooms to its right. ``../shared/tools/import_graph.py`` reads every module's
imports (inside functions too) and reports cycles and imports that run up the flow.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPORT_GRAPH = ROOT.parent / "shared" / "tools" / "import_graph.py"
MAX_MODULE_LINES = 600


@pytest.mark.skipif(not IMPORT_GRAPH.exists(), reason="../shared/tools/import_graph.py is not beside the checkout")
def test_imports_have_no_cycles_and_never_run_up_the_data_flow():
    out = subprocess.run(
        [sys.executable, str(IMPORT_GRAPH)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "0 import cycle(s), 0 upward import(s)", out


def test_no_module_holds_more_than_600_lines():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in (ROOT / "attnopt").rglob("*.py")}
    too_big = {str(p): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_big, f"split these by job: {too_big}"
