"""A finished study as answers: the Pareto front (metric vs latency), the best bundle per latency budget, a PNG.

Works on plain rows (one per complete trial), so the same code reads a study in any storage
and a hand-made list in the tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgekit_runtime.fileio import atomic_write


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per complete trial: its number, metric, latency, parameters and bundle."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append({"trial": t.number, "metric": float(t.values[0]), "latency_ms": float(t.values[1]),
                     "params": dict(t.params), "bundle": a.get("bundle"), "precision": a.get("precision"),
                     "p50_ms": a.get("p50_ms"), "p99_ms": a.get("p99_ms"), "worker": a.get("worker"),
                     "seconds": a.get("seconds")})
    return rows


def _better_or_equal(a: float, b: float, maximize: bool) -> bool:
    return a >= b if maximize else a <= b


def dominates(a: dict[str, Any], b: dict[str, Any], maximize: bool) -> bool:
    """``a`` is no worse than ``b`` on both objectives and better on one."""
    no_worse = _better_or_equal(a["metric"], b["metric"], maximize) and a["latency_ms"] <= b["latency_ms"]
    better = a["metric"] != b["metric"] or a["latency_ms"] != b["latency_ms"]
    return no_worse and better


def pareto_front(rows: list[dict[str, Any]], direction: str = "maximize") -> list[dict[str, Any]]:
    """The rows no other row dominates, fastest first."""
    maximize = direction == "maximize"
    front = [r for r in rows if not any(dominates(o, r, maximize) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["latency_ms"], -r["metric"] if maximize else r["metric"]))


def best_per_budget(rows: list[dict[str, Any]], budgets: list[float], direction: str = "maximize"
                    ) -> list[dict[str, Any]]:
    """For each budget, the trial with the best metric among those at or under it (ties: the faster), or none."""
    maximize = direction == "maximize"
    out = []
    for budget in sorted(budgets):
        fits = [r for r in rows if r["latency_ms"] <= budget]
        best = (max(fits, key=lambda r: (r["metric"] if maximize else -r["metric"], -r["latency_ms"]))
                if fits else None)
        out.append({"budget_ms": budget, "best": best,
                    "fastest_ms": min((r["latency_ms"] for r in rows), default=None)})
    return out


def summary(study: Any, direction: str, latency: str, budgets: list[float], counts: dict[str, int]
            ) -> dict[str, Any]:
    rows = trial_rows(study)
    front = pareto_front(rows, direction)
    attrs = dict(study.user_attrs)
    return {"study": study.study_name, "target": attrs.get("target"), "measured_on": attrs.get("measured_on"),
            "objectives": {"metric": direction, "latency": f"{latency} ms (minimize)"},
            "counts": counts, "front": front, "budgets": best_per_budget(rows, budgets, direction),
            "trials": rows}


def write_outputs(doc: dict[str, Any], out: Path, direction: str) -> dict[str, str]:
    """``front.json`` and ``front.png`` in the study folder; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "front.json", "png": out / "front.png"}
    atomic_write(paths["json"], json.dumps(doc, indent=2, default=str).encode(), durable=False)
    plot_front(doc["trials"], doc["front"], paths["png"], title=f"{doc['study']} on {doc['target']}",
               latency_label=doc["objectives"]["latency"], budgets=[b["budget_ms"] for b in doc["budgets"]])
    return {k: str(v) for k, v in paths.items()}


def plot_front(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path, *, title: str,
               latency_label: str, budgets: list[float]) -> None:
    """Every complete trial as a dot, the front as a step line, budgets as dashed verticals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if rows:
        ax.scatter([r["latency_ms"] for r in rows], [r["metric"] for r in rows], s=18, color="0.6", label="trials")
    if front:
        ax.step([r["latency_ms"] for r in front], [r["metric"] for r in front], where="post", color="tab:blue")
        ax.scatter([r["latency_ms"] for r in front], [r["metric"] for r in front], s=36, color="tab:blue",
                   label="Pareto front", zorder=3)
        for r in front:
            ax.annotate(f"#{r['trial']}", (r["latency_ms"], r["metric"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    for b in budgets:
        if math.isfinite(b):
            ax.axvline(b, color="tab:red", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"latency, {latency_label}")
    ax.set_ylabel("deployed metric")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
