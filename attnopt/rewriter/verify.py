"""Checks that a plan fits the model it is applied to: before anything changes, and as it runs.

A plan names sites by module path (``model.layers.0.self_attn#0``). Applied to another model, or
to this model after it changed, those names may match nothing, or match modules of another shape,
and a rewrite that silently matches nothing leaves the user believing their model is optimised.
Two checks close that gap:

* :func:`module_structure` records, at planning time, each site module's type and its
  projections' shapes; :func:`check_modules` compares a model against that record without
  running it (``attnopt.apply(model, plan)`` needs no example call);
* :class:`SiteCoverage` compares the sites the installed rewrite actually met in the model's
  graphs with the planned ones, at the first call (and every call that compiles anew).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from attnopt.patterns.site import AttentionSite

__all__ = ["PlanMismatchError", "module_structure", "check_modules", "SiteCoverage", "site_module"]

#: Structure keys compared between a planned site and the site met at run time. Causality and
#: masks are left out: a decode step (one query) of a causal site shows no causal mask.
RUNTIME_KEYS = ("num_heads", "num_kv_heads", "head_dim")


class PlanMismatchError(ValueError):
    """A plan does not fit the model: a planned site is missing, new, or of another shape."""


def site_module(site_name: str) -> str:
    """The module path of a site name (``model.layers.0.self_attn#0`` -> ``model.layers.0.self_attn``)."""
    path = site_name.rsplit("#", 1)[0]
    return "" if path == "<root>" else path


def module_structure(model: torch.nn.Module, sites: Iterable[AttentionSite]) -> dict[str, dict[str, Any]]:
    """Per site module: its class and its projections' ``[in, out]`` features, for :func:`check_modules`."""
    out: dict[str, dict[str, Any]] = {}
    for s in sites:
        try:
            mod = model.get_submodule(s.module_path) if s.module_path else model
        except AttributeError:
            continue
        projections = {}
        for path in s.projections.values():
            shape = _linear_shape(model, path)
            if shape is not None:
                projections[path] = shape
        entry = out.setdefault(s.module_path, {"type": _type_name(mod), "projections": {}})
        entry["projections"].update(projections)
    return out


def check_modules(
    model: torch.nn.Module, planned_sites: Iterable[str], modules: Mapping[str, Mapping[str, Any]]
) -> None:
    """Refuse a model whose modules do not have the structure the plan was made for.

    Every planned site's module must exist with the recorded class and projection shapes, and
    the model must have no further module of a planned site's class (a plan for 3 layers applied
    to 4 would leave one layer unplanned). ``modules`` may be empty (a plan saved before this
    record existed): only the paths are checked then.

    Raises:
        PlanMismatchError: naming the first differences.
    """
    diffs: list[str] = []
    paths = sorted({site_module(n) for n in planned_sites})
    types = set()
    for path in paths:
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            diffs.append(f"planned site module {path!r} not found in the model")
            continue
        want = modules.get(path, {})
        if want.get("type") and want["type"] != _type_name(mod):
            diffs.append(f"{path} is a {_type_name(mod)}, the plan was made for a {want['type']}")
        types.add(want.get("type") or _type_name(mod))
        for proj, shape in want.get("projections", {}).items():
            got = _linear_shape(model, proj)
            if got is None:
                diffs.append(f"projection {proj} not found")
            elif list(got) != list(shape):
                diffs.append(f"{proj} maps {got[0]}->{got[1]} features, the plan's {shape[0]}->{shape[1]}")
    if modules:
        unplanned = [name for name, m in model.named_modules() if _type_name(m) in types and name not in paths]
        diffs += [f"module {name} ({_type_name(model.get_submodule(name))}) is not in the plan" for name in unplanned]
    if diffs:
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise PlanMismatchError(
            f"Expected {type(model).__name__} to have the attention structure the plan was made for, but "
            f"{'; '.join(diffs[:4])}{more}. Re-plan for this model with attnopt.plan() or attnopt.optimize()."
        )


class SiteCoverage:
    """Which planned sites the installed rewrite has met, and whether they have the planned shape.

    Args:
        planned: site name -> the planned structure (:meth:`AttentionSite.structure`), for the
            sites under the installed module's ``prefix``.
    """

    def __init__(self, planned: Mapping[str, Mapping[str, Any]]) -> None:
        self.planned = dict(planned)
        self.seen: set[str] = set()
        self.changed: list[str] = []

    def record(self, sites: Iterable[AttentionSite]) -> None:
        """Note the sites one captured graph holds (called by the backend for every graph)."""
        for s in sites:
            self.note(s.name, s.structure())

    def note(self, name: str, got: Mapping[str, Any]) -> None:
        """Note one site met at run time with the structure ``got`` (at least :data:`RUNTIME_KEYS`)."""
        self.seen.add(name)
        want = self.planned.get(name)
        if want is None:
            return
        diff = [f"{k} {want[k]!r}->{got[k]!r}" for k in RUNTIME_KEYS if want.get(k) is not None and want[k] != got[k]]
        if diff:
            self.changed.append(f"{name}: {', '.join(diff)}")

    def check(self, model_name: str) -> None:
        """Raise :class:`PlanMismatchError` if a planned site was never met or met with another shape."""
        missing = sorted(set(self.planned) - self.seen)
        unplanned = sorted(self.seen - set(self.planned))
        if not (missing or self.changed or unplanned):
            return
        parts = []
        if missing:
            parts.append(f"planned site(s) not found in the running model: {_names(missing)}")
        if unplanned:
            parts.append(f"site(s) the plan does not know: {_names(unplanned)}")
        if self.changed:
            parts.append(f"site(s) of another shape than planned: {'; '.join(self.changed[:4])}")
        raise PlanMismatchError(
            f"Expected {model_name} to run the attention sites its plan was made for, but {' and '.join(parts)}. "
            "The model changed after planning (or the plan is another model's): re-plan it with "
            "attnopt.optimize() or attnopt.plan()."
        )


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def _type_name(mod: torch.nn.Module) -> str:
    return type(mod).__name__


def _linear_shape(model: torch.nn.Module, path: str) -> list[int] | None:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if type(mod).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is (in, out)
        return [int(weight.shape[0]), int(weight.shape[1])]
    return [int(weight.shape[1]), int(weight.shape[0])]
