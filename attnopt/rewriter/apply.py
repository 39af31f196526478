"""Applying a plan to a model: check it fits, rewrite weights where it says so, install the rest.

What runs afterwards costs nothing beyond the plan's own operators where that is possible: a
plan that leaves every site exact (after weight rewrites such as head pruning) installs nothing;
a Hugging Face model whose sites dispatch through transformers' attention registry is routed
there (:mod:`~attnopt.rewriter.hf_route`); anything else runs the dynamo-captured graph rewrite
(:mod:`~attnopt.rewriter.install`). The compile backend and ``attnopt.export`` read a plan the
same way, through :func:`plan_choices`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnopt.patterns.site import AttentionSite
from attnopt.replacements.base import get_family, rewrites_weights
from attnopt.rewriter.capture import CapturedPart
from attnopt.rewriter.hf_route import route
from attnopt.rewriter.install import install, uninstall_all
from attnopt.rewriter.rewrite import Choice
from attnopt.rewriter.verify import check_modules, site_module

__all__ = ["install_choices", "install_plan", "plan_choices"]


def plan_choices(plan: Any, *, applied: bool = False) -> dict[str, Choice]:
    """The rewrite's view of a plan: family, config JSON and tensors per site.

    One-query (decode) calls run exact attention unless the entry says the family's own decode
    form serves them (``PlanEntry.decode == "family"``); calls with fewer keys than the entry's
    ``min_len`` (where the variant stops paying off) run exact attention too. With ``applied``,
    the plan's weight rewrites have been made, so their sites run the exact operator.
    """
    choices = {}
    for e in plan.entries:
        if applied and rewrites_weights(e.family):
            choices[e.site] = Choice("exact")
        else:
            min_q_len = 1 if e.decode == "family" else 2
            choices[e.site] = Choice(e.family, e.config, list(e.params), min_q_len=min_q_len, min_kv_len=e.min_len)
    return choices


def install_choices(
    model: torch.nn.Module,
    parts: list[CapturedPart] | list[str],
    choices: dict[str, Choice],
    expected: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Install ``choices`` on every captured part of ``model`` (paths or parts).

    ``expected`` (site name -> planned structure) makes each part check, at its first call, that
    it runs exactly its planned sites (see :func:`attnopt.rewriter.install.install`).
    """
    uninstall_all(model)
    paths = [part if isinstance(part, str) else part.path for part in parts]
    for path in paths:
        module = model.get_submodule(path) if path else model
        mine = None
        if expected is not None:
            mine = {n: st for n, st in expected.items() if _owning_part(site_module(n), paths) == path}
        install(module, _chooser(choices), prefix=path, choices=choices, expected=mine)


def _chooser(choices: dict[str, Choice]):
    def choose(site: AttentionSite) -> Choice | None:
        return choices.get(site.name) if site.rewritable else None

    return choose


def _owning_part(module_path: str, parts: list[str]) -> str | None:
    """The longest part path that contains ``module_path`` ('' contains everything)."""
    owners = [p for p in parts if not p or module_path == p or module_path.startswith(p + ".")]
    return max(owners, key=len) if owners else None


def install_plan(
    model: torch.nn.Module, plan: Any, sites: list[AttentionSite] | None = None, *, prefer_route: bool = True
) -> torch.nn.Module:
    """Apply ``plan`` to ``model``: check it fits, make its weight rewrites, install the rest.

    ``prefer_route=False`` skips transformers' attention registry (see the module docstring).

    Raises:
        PlanMismatchError: the model's modules differ from those the plan was made for (checked
            without running the model; the sites themselves are checked at the first call).
        ValueError: a weight rewrite for a site no capture (``sites``) describes.
    """
    check_modules(model, [e.site for e in plan.entries], plan.modules)
    expected = {d["name"]: dict(d) for d in plan.sites}
    by_name = {s.name: s for s in (sites or [])}
    for e in plan.entries:
        if not rewrites_weights(e.family):
            continue
        if e.site not in by_name:
            raise ValueError(
                f"Expected the site {e.site} to be known when applying {e.family}, but no capture of it "
                "was given; call attnopt.apply(model, plan, example=...) with an example call."
            )
        get_family(e.family).apply_to_model(model, by_name[e.site], e)
        for key in ("num_heads", "num_kv_heads"):  # the site now runs on other weights' heads
            expected.get(e.site, {}).pop(key, None)
    choices = plan_choices(plan, applied=True)
    uninstall_all(model)
    model._attnopt_plan = plan
    if all(c.family == "exact" for c in choices.values()):
        return model
    if prefer_route and route(model, choices, expected):
        return model
    install_choices(model, getattr(plan, "parts", None) or [""], choices, expected=expected or None)
    return model
