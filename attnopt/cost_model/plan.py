"""The Plan: what was chosen for every site, as data (JSON + safetensors), never code.

A plan directory holds

* ``plan.json`` — schema version, versions, device, budget, the model's attention fingerprint,
  the sites' structures, one entry per site (family, config JSON, parameter keys, predicted and
  measured latency, error, notes), the Pareto front, the explanation and planning timings;
* ``params.safetensors`` — every fitted tensor, keyed ``"<site>/<index>"``; its SHA-256 is
  recorded in ``plan.json`` so a corrupted or swapped file is caught on load, and so is the
  SHA-256 of ``plan.json``'s own content (``files.plan_sha256``);
* ``report.md`` and PNG plots (Pareto front; per-head attention distance when calibration
  statistics are given) for people — never read back.

:func:`load_plan` validates everything (:mod:`attnopt.cost_model.plan_checks`) before returning.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import attnopt.cost_model.plan_checks as checks
from attnopt.cost_model.budget import Budget
from attnopt.cost_model.plan_checks import content_sha256, file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from attnopt.replacements.base import FamilyConfig

__all__ = ["PLAN_SCHEMA_VERSION", "Plan", "PlanEntry", "fingerprint", "load_plan"]

#: Version of the ``plan.json`` layout; bump when a field's meaning changes.
PLAN_SCHEMA_VERSION = 1

PLAN_FILE = "plan.json"
PARAMS_FILE = "params.safetensors"
REPORT_FILE = "report.md"


def _structures(sites) -> list[dict[str, Any]]:
    items = sites.values() if isinstance(sites, dict) else sites
    out = [s if isinstance(s, dict) else s.structure() for s in items]
    return sorted(out, key=lambda d: d["name"])


def fingerprint(sites) -> str:
    """SHA-256 (hex, first 16 chars) of the sites' :meth:`AttentionSite.structure`, order-free.

    ``sites`` is a list or dict of :class:`AttentionSite` (or of their ``structure()`` dicts).
    """
    text = json.dumps(_structures(sites), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PlanEntry:
    """What one site runs.

    Attributes:
        site: site name.
        family: family name; ``config`` that family's ``FamilyConfig.to_json()``.
        params: fitted tensors in operator order.
        predicted_s / measured_s: latency per call (measured is None when not timed).
        exact_predicted_s / exact_measured_s: the same for exact attention at the site.
        error: relative L2 error of the site output on calibration data; ``cosine`` its cosine.
        notes: free text for reports.
        decode: what one-query decode steps run: ``"exact"``, or ``"family"`` where the family
            defines a decode form for this config (see ``Family.decode_form``).
        min_len: calls with fewer keys run exact attention: the context length below which the
            variant is predicted not to pay off (0: every length).
        end_to_end: the model's end-to-end error in the budget's metric with only this site
            changed, measured on calibration calls (None when not measured).
    """

    site: str
    family: str
    config: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    predicted_s: float | None = None
    measured_s: float | None = None
    exact_predicted_s: float | None = None
    exact_measured_s: float | None = None
    error: float = 0.0
    cosine: float | None = None
    notes: str = ""
    decode: str = "exact"
    min_len: int = 0
    end_to_end: float | None = None

    def config_object(self) -> FamilyConfig:
        """The family's frozen config rebuilt from JSON."""
        from attnopt.replacements.base import get_family

        return get_family(self.family).config_type.from_json(self.config)

    def describe(self) -> str:
        fields = self.config.get("fields", {})
        return " ".join(f"{k}={v}" for k, v in fields.items()) or "-"

    def _json(self) -> dict[str, Any]:
        keys = [f"{self.site}/{i}" for i in range(len(self.params))]
        return {
            "site": self.site,
            "family": self.family,
            "config": self.config,
            "param_keys": keys,
            "predicted_s": self.predicted_s,
            "measured_s": self.measured_s,
            "exact_predicted_s": self.exact_predicted_s,
            "exact_measured_s": self.exact_measured_s,
            "error": self.error,
            "cosine": self.cosine,
            "notes": self.notes,
            "decode": self.decode,
            "min_len": self.min_len,
            "end_to_end": self.end_to_end,
        }


@dataclass
class Plan:
    """A complete plan; see the module docstring for the files it saves to.

    Attributes:
        entries: one :class:`PlanEntry` per site.
        budget: the budget planned for.
        device / target: the profile's device name and the requested target.
        fingerprint: :func:`fingerprint` of the sites planned for; ``sites`` their structures.
        pareto: the speed/error front as ``{"seconds", "error", "speedup"}`` dicts.
        explanation: why the budget was not reached ("" when it was).
        feasible: whether the speed target was met.
        totals: ``{"exact_s", "planned_s", "speedup", "error"}``.
        timings: seconds spent per planning step (``"profile"``, ``"errors"``, ``"solve"``, ...).
        versions: attnopt/torch/triton versions that wrote the plan.
        parts: module paths the plan is installed on ('' = the whole model; several when the
            model could only be captured by parts).
        steps: what end-to-end validation did (each tightening step, then the validated error).
        modules: per site module, its class and projection shapes
            (:func:`attnopt.rewriter.verify.module_structure`), so a plan can be checked against
            a model without running it; empty in plans saved before it was recorded.
    """

    entries: list[PlanEntry]
    budget: Budget
    device: str = ""
    target: str = ""
    fingerprint: str = ""
    sites: list[dict[str, Any]] = field(default_factory=list)
    pareto: list[dict[str, float]] = field(default_factory=list)
    explanation: str = ""
    feasible: bool = True
    totals: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    parts: list[str] = field(default_factory=lambda: [""])
    steps: list[str] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION

    def entry(self, site: str) -> PlanEntry:
        """The entry of ``site``; raises ``KeyError`` naming the planned sites."""
        for e in self.entries:
            if e.site == site:
                return e
        raise KeyError(
            f"Expected a site planned in this plan, but got {site!r}; planned: {[e.site for e in self.entries]}."
        )

    def check_fingerprint(self, sites) -> None:
        """Raise ``ValueError`` when ``sites`` do not have the structure this plan was made for."""
        got = fingerprint(sites)
        if got == self.fingerprint:
            return
        mine = {d["name"]: d for d in self.sites}
        theirs = {d["name"]: d for d in _structures(sites)}
        diffs = [f"missing site {n}" for n in sorted(set(mine) - set(theirs))]
        diffs += [f"new site {n}" for n in sorted(set(theirs) - set(mine))]
        for n in sorted(set(mine) & set(theirs)):
            changed = [k for k in mine[n] if mine[n].get(k) != theirs[n].get(k)]
            if changed:
                diffs.append(
                    f"{n}: " + ", ".join(f"{k} {mine[n][k]!r}->{theirs[n].get(k)!r}" for k in changed)
                )
        raise ValueError(
            f"Expected a model with attention fingerprint {self.fingerprint}, but got {got} "
            f"({'; '.join(diffs[:5]) or 'structures differ'}). Re-plan for this model with attnopt.plan()."
        )

    def headline(self) -> str:
        """One line: what the plan chose, its predicted speedup and its validated error.

        Example: ``"4 sites: block_sparse x3, head_pruned x1; predicted 2.11x attention;
        perplexity 0.0091 <= 0.015 (validated)"``.
        """
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.family] = counts.get(e.family, 0) + 1
        chosen = ", ".join(f"{f} x{n}" for f, n in sorted(counts.items(), key=lambda kv: (kv[0] == "exact", kv[0])))
        speed = self.totals.get("speedup", 1.0)
        scope = "whole model" if self.budget.scope == "model" else "attention"
        err = self.totals.get("validated_error")
        judged = (
            f"{self.budget.metric} {err:.3g} <= {self.budget.tolerance:g} (validated)"
            if err is not None
            else f"{self.budget.metric} tolerance {self.budget.tolerance:g}"
        )
        return f"{len(self.entries)} site(s): {chosen or 'none'}; predicted {speed:.2f}x {scope}; {judged}"

    def summary(self) -> str:
        """Markdown table: site, family, config, decode path, predicted and measured latency, errors.

        ``rel error`` is the site output's relative error on calibration data; ``end-to-end`` the
        model's error in the budget's metric with only that site changed, where it was measured
        (then the plan's summed error is the sum of those).
        """
        lines = [
            "| site | family | config | decode | exact below | predicted ms | measured ms | exact ms | rel error "
            "| end-to-end |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in self.entries:
            exact = e.exact_measured_s if e.exact_measured_s is not None else e.exact_predicted_s
            alone = "-" if e.end_to_end is None else f"{e.end_to_end:.3g}"
            lines.append(
                f"| {e.site} | {e.family} | {e.describe()} | {e.decode} | {e.min_len or '-'} | {_ms(e.predicted_s)} | "
                f"{_ms(e.measured_s)} | "
                f"{_ms(exact)} | {e.error:.3g} | {alone} |"
            )
        t = self.totals
        if t:
            kind = "end-to-end" if any(e.end_to_end is not None for e in self.entries) else "site"
            lines.append(
                f"\nTotal: {_ms(t.get('planned_s'))} ms vs exact {_ms(t.get('exact_s'))} ms "
                f"({t.get('speedup', 1.0):.2f}x), summed {kind} error {t.get('error', 0.0):.3g}; "
                f"budget {self.budget.describe()}."
            )
        if self.explanation:
            lines.append(self.explanation)
        lines.extend(self.steps)
        if self.timings:
            steps = {k: v for k, v in self.timings.items() if not k.startswith("fit ")}
            fits = {k: v for k, v in self.timings.items() if k.startswith("fit ")}
            spent = ", ".join(f"{k} {v:.1f}s" for k, v in steps.items())
            within = f" (candidates: {', '.join(f'{k} {v:.1f}s' for k, v in fits.items())})" if fits else ""
            lines.append(f"Planning took {sum(steps.values()):.1f}s: {spent}{within}.")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The ``plan.json`` content without the params file's hash."""
        return {
            "schema_version": self.schema_version,
            "versions": self.versions,
            "device": self.device,
            "target": self.target,
            "budget": self.budget.to_json(),
            "fingerprint": self.fingerprint,
            "sites": self.sites,
            "entries": [e._json() for e in self.entries],
            "pareto": self.pareto,
            "explanation": self.explanation,
            "feasible": self.feasible,
            "totals": self.totals,
            "timings": self.timings,
            "parts": self.parts,
            "steps": self.steps,
            "modules": self.modules,
        }

    def save(
        self, directory: str | os.PathLike, *, stats=None, sources: dict[str, str] | None = None
    ) -> pathlib.Path:
        """Write the plan directory (see the module docstring) and return its path.

        The save is atomic for readers: every file is first written into a staging folder
        inside ``directory`` (same file system, so renames are atomic), then moved into place
        with ``plan.json`` last. A crash before that leaves the previous plan intact; a crash
        after the params file moved but before ``plan.json`` leaves the old ``plan.json``,
        whose recorded SHA-256 then refuses the new params — never a half-written file loaded.

        Args:
            stats: optional ``{site: SiteStats}``; adds the attention-distance heatmap.
            sources: optional ``{file name: text}`` (generated kernel sources) written under ``kernels/``.
        """
        import shutil
        import tempfile

        from safetensors.torch import save_file

        from attnopt.cost_model.report import write_report

        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        stage = pathlib.Path(tempfile.mkdtemp(prefix=".attnopt-save-", dir=d))
        try:
            tensors = {
                f"{e.site}/{i}": p.detach().to("cpu").contiguous()
                for e in self.entries
                for i, p in enumerate(e.params)
            }
            save_file(tensors, str(stage / PARAMS_FILE), metadata={"format": "attnopt-plan-params"})
            data = checks.finite_for_saving(json.loads(json.dumps(self.to_json(), default=_json_default)))
            data["files"] = {
                "params": PARAMS_FILE,
                "params_sha256": _sha256(stage / PARAMS_FILE),
                "plan_sha256": content_sha256(data),
            }
            # Never write what load_plan would refuse: the same rules, before anything moves.
            checks.check_missing(d / PLAN_FILE, data)
            checks.check_top_level(d / PLAN_FILE, data)
            checks.check_entries(d / PLAN_FILE, data["entries"])
            checks.check_budget(d / PLAN_FILE, data["budget"])
            _write_synced(stage / PLAN_FILE, json.dumps(data, indent=2, sort_keys=True))
            for name, text in (sources or {}).items():
                path = stage / "kernels" / pathlib.Path(name).name
                path.parent.mkdir(exist_ok=True)
                path.write_text(text)
            write_report(self, stage, stats=stats)
            _fsync(stage / PARAMS_FILE)
            for path in sorted(stage.rglob("*"), key=lambda q: (q.name == PLAN_FILE, str(q))):
                if path.is_file():
                    dest = d / path.relative_to(stage)
                    dest.parent.mkdir(exist_ok=True)
                    os.replace(path, dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return d


def _write_synced(path: pathlib.Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: pathlib.Path) -> None:
    """Flush ``path`` to disk so a rename after it never exposes a file still in the page cache only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"Expected JSON data in a plan, but got {type(obj).__name__}.")


_sha256 = file_sha256


class _NotFinite(Exception):
    pass


def _refuse_constant(name: str):
    """NaN and Infinity are refused anywhere in plan.json, free-form site structures included."""
    raise _NotFinite(name)


def load_plan(directory: str | os.PathLike) -> Plan:
    """Read and fully validate a plan directory written by :meth:`Plan.save`.

    Plans are data from strangers, so nothing is trusted before it is checked (see
    :mod:`attnopt.cost_model.plan_checks`): sizes before reading, every JSON field's type,
    families and their configs, the params file name (confined to the directory), both
    SHA-256s, the safetensors header, and that the tensors are exactly those the entries name.
    Tensors are read with ``safetensors`` only, never with pickle.

    Raises:
        FileNotFoundError: ``plan.json`` or ``params.safetensors`` missing (named in the message).
        ValueError: anything else wrong, in one sentence naming the file and the field.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = pathlib.Path(directory)
    plan_path = d / PLAN_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(
            f"Expected a plan file at {plan_path}, but it does not exist. Save a plan with Plan.save()."
        )
    checks.check_size(plan_path, checks.MAX_PLAN_JSON_BYTES)
    try:
        data = json.loads(plan_path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except _NotFinite as e:
        raise ValueError(
            f"Expected only finite numbers in {plan_path}, but it holds {e}. Re-save the plan."
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(
            " ".join(f"Expected valid JSON in {plan_path}, but it is corrupted or truncated ({e}). Re-save the plan.".split())
        ) from e
    if not isinstance(data, dict):
        raise ValueError(
            f"Expected a JSON object in {plan_path}, but got {type(data).__name__}. Re-save the plan."
        )
    version = data.get("schema_version")
    if not checks.is_int(version):
        raise checks.fail(plan_path, "schema_version", "an integer", version)
    if version > PLAN_SCHEMA_VERSION:
        versions = data.get("versions")
        written = versions.get("attnopt") if isinstance(versions, dict) else None
        raise ValueError(
            f"Expected plan schema version <= {PLAN_SCHEMA_VERSION}, but {plan_path} has version {version} "
            f"(written by attnopt {written if isinstance(written, str) else 'a newer attnopt'!s:.40}). "
            "Upgrade attnopt to load this plan."
        )
    checks.check_missing(plan_path, data)
    data = checks.migrate(plan_path, data, PLAN_SCHEMA_VERSION)
    checks.check_top_level(plan_path, data)
    checks.check_entries(plan_path, data["entries"])
    budget = checks.check_budget(plan_path, data["budget"])
    files = data["files"]
    if "plan_sha256" in files and checks.content_sha256(data) != files["plan_sha256"]:
        raise ValueError(
            f"Expected the content of {plan_path} to match its recorded files.plan_sha256, but it differs "
            "(corrupted or edited). Re-save the plan."
        )
    params_path = checks.check_params_name(plan_path, d, files.get("params", PARAMS_FILE))
    if _sha256(params_path) != files["params_sha256"]:
        raise ValueError(
            f"Expected {params_path} to match the SHA-256 recorded in {plan_path}, but it differs "
            "(corrupted or from another plan). Re-save the plan."
        )
    keys = [k for e in data["entries"] for k in e["param_keys"]]
    checks.check_params_header(params_path, keys)
    try:
        tensors = load_file(str(params_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            " ".join(f"Expected a readable safetensors file at {params_path}, but got: {e}. Re-save the plan.".split())
        ) from e
    entries = []
    for e in data["entries"]:
        fields = {k: e[k] for k in PlanEntry.__dataclass_fields__ if k != "params" and k in e}
        entries.append(PlanEntry(params=[tensors[k] for k in e["param_keys"]], **fields))
    return Plan(
        entries=entries,
        budget=budget,
        device=data.get("device", ""),
        target=data.get("target", ""),
        fingerprint=data["fingerprint"],
        sites=data.get("sites", []),
        pareto=data.get("pareto", []),
        explanation=data.get("explanation", ""),
        feasible=data.get("feasible", True),
        totals=data.get("totals", {}),
        timings=data.get("timings", {}),
        versions=data.get("versions", {}),
        parts=data.get("parts", [""]),
        steps=data.get("steps", []),
        modules=data.get("modules", {}),
        schema_version=data["schema_version"],
    )
