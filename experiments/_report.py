"""``report.html``: one self-contained page per run (plots as base64 PNG, tables, the spec).

Self-contained because reports are mailed, attached to issues and opened from a laptop long after
the GPU box is gone: no external CSS, scripts or image files.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import yaml

from evomerge.merge import write_atomic

from . import _plots
from ._results import RunView, format_value
from ._rundir import RunDir
from ._runlog import read_events

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
tr.best td{background:#eaf6ea;font-weight:600} .muted{color:#777} img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
"""


def _table(header: list[str], rows: list[list[str]], highlight: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=best' if i in highlight else ''}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def _section(key: str, title: str, *body: str) -> str:
    """One ``<section>`` with an id (what the report's test finds in the rendered page)."""
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>' + "".join(body) + "</section>"


def _summary(view: RunView) -> str:
    """Status, trials, elapsed, what stopped the run, front size, hypervolume with its reference point."""
    return _section("summary", "Summary", _table(["", ""], [[k, v] for k, v in view.summary().items()]))


def _compared(labels: list[str]) -> list[str]:
    """What a comparison table holds, in words, from its row labels (`finish_run` names them)."""
    kinds = [("searched", "merged"), ("expert:", "experts"), ("mergekit:", "mergekit baselines"), ("uniform grid", "uniform grid")]
    return [word for prefix, word in kinds if any(label.startswith(prefix) for label in labels)]


def _comparison(view: RunView) -> str:
    if not view.comparison or "scores" not in view.comparison:
        return ""
    header, rows, best = view.comparison_rows()
    note = html.escape(view.comparison.get("note", ""))
    title = " vs. ".join(_compared(list(view.comparison["scores"]))).capitalize() + " (held-out sets)"
    return _section("comparison", title, f"<p class=muted>{note}</p>", _table(header, rows, best))


def _references(view: RunView) -> str:
    """The base, experts, mergekit baselines and grid on the search's own objectives (calibration sets)."""
    if not view.references:
        return ""
    names = view.objective_names
    rows = [[ref.name, *(format_value(ref.values.get(n)) for n in names)] for ref in view.references]
    shown = ["the base" if any(r.name == "base" for r in view.references) else "",
             *(word for word in _compared([r.name for r in view.references]) if word != "merged")]
    what = ", ".join(w for w in shown if w)
    return _section("references", "Reference models on the search's objectives",
                    f"<p class=muted>{html.escape(what.capitalize())}, scored like every trial.</p>",
                    _table(["model", *names], rows))


def _constants(view: RunView) -> str:
    """One line per objective that never changed (no panel for a flat line)."""
    constant = view.constant_objectives
    if not constant:
        return ""
    items = "".join(f"<li>{html.escape(n)} = {format_value(v)} in all {len(view.completed)} completed trials</li>"
                    for n, v in constant.items())
    return _section("constant-objectives", "Objectives that never changed", f"<ul>{items}</ul>")


def _timings(view: RunView) -> str:
    """Per-trial merge / swap / inference seconds (plot) and their medians (table)."""
    png = _plots.trial_timings(view)
    if png is None:
        return ""
    finished = [t for t in view.trials if t.timings]
    phases = [p for p in (*_plots.TIMING_PHASES, "total") if any(p in t.timings for t in finished)]
    medians = [[p, format_value(float(np.median([t.timings[p] for t in finished if p in t.timings])))] for p in phases]
    return _section("timings", "Time per trial", _img(png, "seconds per trial and phase"),
                    _table(["phase", "median seconds"], medians))


def _memory(view: RunView) -> str:
    """Memory after each trial, when the run's events.jsonl recorded it."""
    samples = [(int(e["trial"]), e["memory"]) for e in read_events(RunDir(view.run_dir).events_file)
               if e["event"] == "trial" and e.get("stage") == view.stage and isinstance(e.get("memory"), dict)]
    png = _plots.trial_memory(samples)
    return "" if png is None else _section("memory", "Memory", _img(png, "memory after each trial"))


def render(view: RunView) -> str:
    """The report page as one HTML string."""
    best = view.best_mean_trial()
    spec_yaml = yaml.safe_dump(view.spec.model_dump(mode="json", by_alias=True), sort_keys=False)
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>evomerge: {html.escape(view.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>evomerge run: {html.escape(view.name)}</h1>",
        f"<p class=muted>{html.escape(view.spec.description)}</p>",
        _summary(view),
        _comparison(view),
        _references(view),
        _section("front", "Pareto front", _table(*view.front_rows()), _img(_plots.front_pairs(view), "objective pairs"),
                 _img(_plots.hypervolume_curve(view), "hypervolume"), _img(_plots.best_so_far(view), "best so far")),
        _constants(view),
        _timings(view),
        _memory(view),
    ]
    if best is not None:
        parts.append(_section("profile", f"Coefficients of trial {best} (best mean task {view.headline_kind})",
                              _img(_plots.layer_profile(view, best), "profile")))
    if view.failed:
        parts.append(_section("failed", "Failed trials", _table(["trial", "reason"], [[str(t.number), t.failure or ""] for t in view.failed])))
    parts += [
        _section("spec", "Spec", f"<details><summary>resolved spec</summary><pre>{html.escape(spec_yaml)}</pre></details>"),
        f"<p class=muted>run folder: {html.escape(str(view.run_dir))}</p></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(view: RunView, out: Path | None = None) -> Path:
    """Write ``report.html`` into the run folder (or ``out``); returns its path."""
    path = out or view.run_dir / "report.html"
    write_atomic(path, render(view), durable=False)  # a killed write leaves the old report or none
    return path


