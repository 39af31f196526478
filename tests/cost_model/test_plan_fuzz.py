"""Adversarial plans: every mutation of a saved plan is refused in one line, harmless, or (when
a stranger re-signed it) loaded faithfully — never another exception, never a silent change."""

from __future__ import annotations

import json
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnopt.cost_model import load_plan
from tests.cost_model.plan_mutations import KINDS, build_plan, run_one, same_plan

_TEMPLATE: dict[str, object] = {}


def _template():
    """Save the plan once per session: mutations start from copies of it."""
    if not _TEMPLATE:
        root = pathlib.Path(tempfile.mkdtemp(prefix="plan-fuzz-"))
        plan = build_plan()
        plan.save(root / "template")
        _TEMPLATE.update(root=root, plan=plan)
    return _TEMPLATE["root"] / "template", _TEMPLATE["plan"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_mutated_plans_are_refused_or_unchanged(kind, seed):
    template, plan = _template()
    with tempfile.TemporaryDirectory() as work:
        run_one(kind, seed, template, pathlib.Path(work) / "w", plan)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_runs(kind):
    template, plan = _template()
    with tempfile.TemporaryDirectory() as work:
        outcomes = {run_one(kind, seed, template, pathlib.Path(work) / "w", plan) for seed in range(5)}
    must_refuse = {"unknown_family", "path_traversal", "older_schema", "truncate_json", "truncate_params"}
    if kind in must_refuse:
        assert outcomes == {"refused"}, (kind, outcomes)


def test_a_crash_mid_save_leaves_the_previous_plan(tmp_path, monkeypatch):
    """Plan.save is staged: if writing fails half way, the plan already there loads unchanged."""
    import attnopt.cost_model.report as report

    plan = build_plan()
    plan.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    changed = build_plan()
    changed.entries[0].params[0].mul_(2)
    changed.totals["error"] = 0.5

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", boom)
    with pytest.raises(OSError, match="disk full"):
        changed.save(tmp_path)
    assert same_plan(load_plan(tmp_path), plan)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".attnopt-save-")]

    # a crash after the params file moved but before plan.json: the old plan.json refuses it
    import os

    real = os.replace

    def replace_but_not_plan(src, dst):
        if str(dst).endswith("plan.json"):
            raise OSError("power cut")
        return real(src, dst)

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", replace_but_not_plan)
    with pytest.raises(OSError, match="power cut"):
        changed.save(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="SHA-256"):
        load_plan(tmp_path)
    changed.save(tmp_path)
    assert same_plan(load_plan(tmp_path), changed)


def test_older_schema_names_both_versions(tmp_path):
    build_plan().save(tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    data["schema_version"] = 0
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"version 1, but .* has version 0 and no migration"):
        load_plan(tmp_path)


def test_oversized_files_are_refused_before_reading(tmp_path, monkeypatch):
    import attnopt.cost_model.plan_checks as checks

    build_plan().save(tmp_path)
    monkeypatch.setattr(checks, "MAX_PARAMS_BYTES", 100)
    with pytest.raises(ValueError, match=r"params\.safetensors to be at most 100 bytes"):
        load_plan(tmp_path)
    monkeypatch.setattr(checks, "MAX_PLAN_JSON_BYTES", 100)
    with pytest.raises(ValueError, match=r"plan\.json to be at most 100 bytes"):
        load_plan(tmp_path)
