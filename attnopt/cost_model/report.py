"""The human side of a plan directory: ``report.md`` and its plots.

Nothing here is read back; a plan is fully described by ``plan.json`` and its safetensors.
Plots need matplotlib (an optional dependency): without it the report says so and lists tables.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Protocol

import torch

from attnopt.patterns.site_stats import SiteStats

__all__ = ["plot_attention_distance", "plot_pareto", "write_report"]

log = logging.getLogger(__name__)


class ReportedPlan(Protocol):
    """What a report reads of a :class:`~attnopt.cost_model.plan.Plan`.

    A protocol rather than the class itself: the plan writes its report when saved, so the
    report must not import the plan back.
    """

    budget: Any
    device: str
    target: str | None
    fingerprint: str
    versions: dict[str, str]
    feasible: bool
    pareto: list[dict[str, float]]
    totals: dict[str, float]
    timings: dict[str, float]

    def summary(self) -> str: ...

PARETO_PNG = "pareto.png"
DISTANCE_PNG = "attention_distance.png"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the plot extra
        return None
    return plt


def plot_pareto(plan: ReportedPlan, path: pathlib.Path) -> bool:
    """Speedup against summed error along the front, the chosen plan marked. False if not drawn."""
    plt = _pyplot()
    if plt is None or not plan.pareto:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [p["speedup"] for p in plan.pareto]
    ys = [p["error"] for p in plan.pareto]
    # least error needed for at least x speedup: the next point up, so the step comes before it
    ax.step(xs, ys, where="pre", marker="o", ms=3, lw=1, label="Pareto front")
    if plan.totals:
        ax.scatter(
            [plan.totals.get("speedup", 1.0)], [plan.totals.get("error", 0.0)], c="C3", zorder=3, label="plan"
        )
    ax.set_xlabel("attention speedup over exact (predicted)")
    ax.set_ylabel("summed per-site relative L2 error")
    ax.set_title(f"budget {plan.budget.describe()}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_attention_distance(stats: dict[str, SiteStats], path: pathlib.Path, max_rows: int = 512) -> bool:
    """Heatmap of attention mass by log2 query-key distance, one row per (site, head)."""
    plt = _pyplot()
    rows, labels = [], []
    for name, st in stats.items():
        if st.distance_mass is None:
            continue
        for h, row in enumerate(st.distance_mass):
            rows.append(row.float())
            labels.append(f"{name} h{h}")
    if plt is None or not rows:
        return False
    rows, labels = rows[:max_rows], labels[:max_rows]
    data = torch.stack(rows).numpy()
    height = min(2 + 0.12 * len(rows), 40)
    fig, ax = plt.subplots(figsize=(7, height))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("distance bin b: keys [2^b - 1, 2^(b+1) - 1) back")
    step = max(1, len(labels) // 64)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels(labels[::step], fontsize=6)
    fig.colorbar(im, ax=ax, label="attention mass")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(
    plan: ReportedPlan, directory: pathlib.Path, *, stats: dict[str, SiteStats] | None = None
) -> pathlib.Path:
    """Write ``report.md`` (and the plots) into ``directory``."""
    lines = [
        "# attnopt plan",
        "",
        f"- budget: {plan.budget.describe()}",
        f"- device: {plan.device} (target {plan.target or '-'})",
        f"- fingerprint: {plan.fingerprint}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in plan.versions.items())}",
        f"- feasible: {plan.feasible}",
        "",
        plan.summary(),
        "",
    ]
    if plot_pareto(plan, directory / PARETO_PNG):
        lines += ["## Pareto front", "", f"![Pareto front]({PARETO_PNG})", ""]
    if plan.pareto:
        lines += ["| speedup | summed error | ms |", "|---|---|---|"]
        lines += [
            f"| {p['speedup']:.2f}x | {p['error']:.3g} | {p['seconds'] * 1e3:.3f} |" for p in plan.pareto
        ]
        lines.append("")
    if stats and plot_attention_distance(stats, directory / DISTANCE_PNG):
        lines += ["## Attention distance per head", "", f"![attention distance]({DISTANCE_PNG})", ""]
    if plan.timings:
        lines += ["## Where planning time went", "", "| step | s |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in plan.timings.items()]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
