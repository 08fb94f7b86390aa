"""``report.html``: one self-contained page per run (plots as base64 PNG, tables, the spec).

Self-contained because reports are mailed, attached to issues and opened from a laptop long after
the GPU box is gone: no external CSS, scripts or image files.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import yaml

from evomerge.merge import write_atomic

from . import _plots
from ._results import RunView, format_value

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


def _summary(view: RunView) -> str:
    s = view.summary()
    rows = [[k, v] for k, v in s.items()]
    return _table(["", ""], rows)


def _front_table(view: RunView) -> str:
    header, rows = view.front_rows()
    return _table(header, rows)


def _comparison(view: RunView) -> str:
    if not view.comparison or "scores" not in view.comparison:
        return ""
    header, rows, best = view.comparison_rows()
    note = html.escape(view.comparison.get("note", ""))
    return f"<h2>Merged vs. experts vs. uniform grid</h2><p class=muted>{note}</p>" + _table(header, rows, best)


def _references(view: RunView) -> str:
    """The base, experts, mergekit baselines and grid on the search's own objectives (calibration sets)."""
    if not view.references:
        return ""
    names = view.objective_names
    rows = [[ref.name, *(format_value(ref.values.get(n)) for n in names)] for ref in view.references]
    return ("<h2>Reference models on the search's objectives</h2><p class=muted>The base, each expert, the "
            "mergekit baselines of the spec and the grid's best, scored like every trial.</p>" + _table(["model", *names], rows))


def render(view: RunView) -> str:
    """The report page as one HTML string."""
    best = view.best_mean_trial()
    spec_yaml = yaml.safe_dump(view.spec.model_dump(mode="json", by_alias=True), sort_keys=False)
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>evomerge: {html.escape(view.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>evomerge run: {html.escape(view.name)}</h1>",
        f"<p class=muted>{html.escape(view.spec.description)}</p>",
        "<h2>Summary</h2>",
        _summary(view),
        _comparison(view),
        _references(view),
        "<h2>Pareto front</h2>",
        _front_table(view),
        _img(_plots.front_pairs(view), "objective pairs"),
        _img(_plots.hypervolume_curve(view), "hypervolume"),
        _img(_plots.best_so_far(view), "best so far"),
    ]
    if best is not None:
        parts += [f"<h2>Coefficients of trial {best} (best mean score)</h2>", _img(_plots.layer_profile(view, best), "profile")]
    parts += [
        "<h2>Failed trials</h2>" if view.failed else "",
        _table(["trial", "reason"], [[str(t.number), t.failure or ""] for t in view.failed]) if view.failed else "",
        f"<h2>Spec</h2><details><summary>resolved spec</summary><pre>{html.escape(spec_yaml)}</pre></details>",
        f"<p class=muted>run folder: {html.escape(str(view.run_dir))}</p></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(view: RunView, out: Path | None = None) -> Path:
    """Write ``report.html`` into the run folder (or ``out``); returns its path."""
    path = out or view.run_dir / "report.html"
    write_atomic(path, render(view), durable=False)  # a killed write leaves the old report or none
    return path


