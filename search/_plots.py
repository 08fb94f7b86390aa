"""PNG figures of a run (matplotlib, Agg backend: no display needed on servers).

* ``front.png``: with 2 objectives, the front (a step line in the optimization directions) over
  the dominated points, infeasible trials marked; with 3+, one panel per objective pair, with the
  front members of the full-dimensional front highlighted (they need not look optimal in a pair).
* ``hypervolume.png``: hypervolume after each evaluation against the run's fixed reference point.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ._ledger import Ledger  # noqa: E402


def _points(ledger: Ledger) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, on_front, feasible) over completed trials."""
    front = {p.number for p in ledger.archive().front}
    rows, on_front, feasible = [], [], []
    for trial in ledger.finished():
        values = ledger.objective_values(trial)
        if values is None:
            continue
        rows.append(values)
        on_front.append(trial.number in front)
        feasible.append(ledger.feasible(trial))
    k = len(ledger.objectives)
    return np.array(rows).reshape(-1, k), np.array(on_front, dtype=bool), np.array(feasible, dtype=bool)


def _panel(ax: plt.Axes, values: np.ndarray, on_front: np.ndarray, feasible: np.ndarray, i: int, j: int,
           labels: list[str], step: bool) -> None:
    dominated = feasible & ~on_front
    ax.scatter(values[dominated, i], values[dominated, j], s=14, c="0.6", label="dominated")
    ax.scatter(values[~feasible, i], values[~feasible, j], s=18, marker="x", c="tab:red", label="infeasible")
    front = values[on_front]
    ax.scatter(front[:, i], front[:, j], s=30, c="tab:blue", edgecolors="k", zorder=3, label="Pareto front")
    if step and len(front):
        order = np.argsort(front[:, i])
        ax.step(front[order, i], front[order, j], where="post", c="tab:blue", lw=1)
    ax.set_xlabel(labels[i])
    ax.set_ylabel(labels[j])


def plot_front(ledger: Ledger, path: str | Path) -> Path:
    """The Pareto front over all completed trials (pairwise panels for 3+ objectives)."""
    values, on_front, feasible = _points(ledger)
    labels = [f"{o.name} ({'max' if o.direction == 'maximize' else 'min'})" for o in ledger.objectives]
    k = len(labels)
    if k == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(values[:, 0], ".", c="0.6")
        ax.set_xlabel("completed trial")
        ax.set_ylabel(labels[0])
    elif k == 2:
        fig, ax = plt.subplots(figsize=(6, 5))
        _panel(ax, values, on_front, feasible, 0, 1, labels, step=True)
        ax.legend(fontsize=8)
    else:
        pairs = list(itertools.combinations(range(k), 2))
        cols = min(3, len(pairs))
        rows = -(-len(pairs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4 * rows), squeeze=False)
        for ax, (i, j) in zip(axes.flat, pairs):
            _panel(ax, values, on_front, feasible, i, j, labels, step=False)
        for ax in list(axes.flat)[len(pairs):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{ledger.study_name}: {int(on_front.sum())} on the front of {len(values)} completed")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_hypervolume(ledger: Ledger, path: str | Path) -> Path:
    """Hypervolume after each finished trial (failures keep it flat)."""
    archive = ledger.archive()
    hv = [h for _, h in archive.history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(hv) + 1), hv, c="tab:blue")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"reference point {archive.reference_point}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(ledger: Ledger, out_dir: str | Path) -> dict[str, Path]:
    """``front.png`` and ``hypervolume.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "front.png": plot_front(ledger, out / "front.png"),
        "hypervolume.png": plot_hypervolume(ledger, out / "hypervolume.png"),
    }
