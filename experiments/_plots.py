"""Matplotlib figures of a run: the one plot module (the report embeds them as base64, and
`write_plots` leaves them as PNG files next to a stage's CSV/JSON exports).

Figures are pure functions of a `RunView` returning PNG bytes: the Agg backend, one figure per
function, closed after rendering so a long batch does not accumulate figures.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evomerge.merge import write_atomic  # noqa: E402

if TYPE_CHECKING:
    from ._results import RunView


def _png(fig: "plt.Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def front_pairs(view: "RunView", max_pairs: int = 6) -> bytes | None:
    """Every pair of objectives that vary (`RunView.varying_objectives`): all trials in grey, the
    Pareto front highlighted, references marked."""
    names = [n for n, _ in view.varying_objectives]
    directions = [d for _, d in view.varying_objectives]
    done = view.completed
    if len(names) < 2 or not done:
        return None
    pairs = list(itertools.combinations(range(len(names)), 2))[:max_pairs]
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    front = set(view.front)
    for ax, (i, j) in zip(axes.flat, pairs):
        xs = [t.values[names[i]] for t in done]
        ys = [t.values[names[j]] for t in done]
        ax.scatter(xs, ys, s=12, c="#bbbbbb", label="trials")
        fx = [t.values[names[i]] for t in done if t.number in front]
        fy = [t.values[names[j]] for t in done if t.number in front]
        ax.scatter(fx, fy, s=28, c="#d62728", label="Pareto front")
        for ref in view.references:
            if names[i] in ref.values and names[j] in ref.values:
                ax.scatter([ref.values[names[i]]], [ref.values[names[j]]], marker="*", s=90, label=ref.name)
        ax.set_xlabel(f"{names[i]} ({directions[i][:3]})")
        ax.set_ylabel(f"{names[j]} ({directions[j][:3]})")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{view.name}: objectives of {len(done)} trials")
    return _png(fig)


def hypervolume_curve(view: "RunView") -> bytes | None:
    """Hypervolume after each evaluation: flat means the search has stopped improving."""
    if not view.hv_history:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([n for n, _ in view.hv_history], [hv for _, hv in view.hv_history], drawstyle="steps-post")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    ax.set_title("hypervolume of the front")
    return _png(fig)


def best_so_far(view: "RunView") -> bytes | None:
    """Best value of each objective that varies over trials (one panel per objective)."""
    done = view.completed
    varying = view.varying_objectives
    if not done or not varying:
        return None
    fig, axes = plt.subplots(1, len(varying), figsize=(3.2 * len(varying), 2.8), squeeze=False)
    for ax, (name, direction) in zip(axes.flat, varying):
        best, xs, ys = None, [], []
        for t in done:
            v = t.values[name]
            best = v if best is None else (max(best, v) if direction == "maximize" else min(best, v))
            xs.append(t.number)
            ys.append(best)
        ax.plot(xs, ys, drawstyle="steps-post")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("trial", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("best so far per objective")
    return _png(fig)


TIMING_PHASES = ("merge", "swap", "inference")
"""The scorer's phases of one evaluation (`evomerge.objectives.Scorer`), each a panel."""


def trial_timings(view: "RunView") -> bytes | None:
    """Seconds per phase (merge, swap, inference) of every finished trial: where the time goes,
    and whether some candidates are much slower than others."""
    finished = [t for t in view.trials if t.state in ("complete", "failed") and t.timings]
    phases = [p for p in TIMING_PHASES if any(p in t.timings for t in finished)]
    if not phases:
        return None
    fig, axes = plt.subplots(1, len(phases), figsize=(3.6 * len(phases), 2.8), squeeze=False)
    for ax, phase in zip(axes.flat, phases):
        for state, color in (("complete", "#1f77b4"), ("failed", "#d62728")):
            points = [(t.number, t.timings[phase]) for t in finished if t.state == state and phase in t.timings]
            if points:
                ax.scatter(*zip(*points), s=10, c=color, label=state)
        ax.set_title(f"{phase} (s)", fontsize=9)
        ax.set_xlabel("trial", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle("seconds per trial and phase", y=1.04)
    return _png(fig)


def trial_memory(samples: list[tuple[int, dict[str, float]]]) -> bytes | None:
    """Memory after each trial (MiB), as events.jsonl records it: resident set, its peak, and the
    CUDA allocator's per-trial peak when a GPU is used; a creeping line is a leak."""
    keys = [k for k in ("rss_mib", "peak_rss_mib", "cuda_peak_mib") if any(k in m for _, m in samples)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in keys:
        points = [(n, m[key]) for n, m in samples if key in m]
        ax.plot(*zip(*points), marker=".", label=key.removesuffix("_mib").replace("_", " "))
    ax.set_xlabel("trial")
    ax.set_ylabel("MiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("memory after each trial")
    return _png(fig)


def layer_profile(view: "RunView", number: int) -> bytes | None:
    """Per-layer-group coefficients of one trial, one line per (kind, expert): what the search chose."""
    trial = view.trial(number)
    if trial is None or not trial.params:
        return None
    series: dict[str, list[tuple[str, float]]] = {}
    for name, value in trial.params.items():
        group, _, rest = name.partition(".")
        series.setdefault(rest, []).append((group, value))
    kinds = sorted({key.split("[")[0].split(".")[-1] for key in series})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for key, points in sorted(series.items()):
            if key.split("[")[0].split(".")[-1] != kind:
                continue
            ax.plot([g for g, _ in points], [v for _, v in points], marker="o", label=key)
        ax.set_title(kind)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"trial {number}: coefficients per layer group")
    return _png(fig)


def write_plots(view: "RunView", out_dir: Path) -> dict[str, Path]:
    """``front.png`` (objective pairs) and ``hypervolume.png`` of the view's stage in ``out_dir``,
    each replaced atomically; a figure with nothing to show is not written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in (("front.png", front_pairs(view)), ("hypervolume.png", hypervolume_curve(view))):
        if png is None:
            continue
        write_atomic(out_dir / name, png, durable=False)
        paths[name] = out_dir / name
    return paths
