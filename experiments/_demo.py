"""``evomerge demo``: the whole story on the toy zoo in about five minutes on a laptop CPU.

1. build (or reuse) the zoo and show that each expert is good at its own skill only;
2. run the ``pareto-layerwise`` preset (per-layer TIES weights and densities, multi-objective TPE
   over each skill's accuracy and sparsity), plus the built-in uniform grid baseline;
3. re-score the best merge, the experts and the grid's best on held-out items;
4. say, with the measured figures, whether the merge beats every expert and the grid on the mean
   over skills, and where the report, the front and the exports are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._rundir import RunDir

if TYPE_CHECKING:
    from ._runlog import Display
    from ._signals import SignalLog

PRESET = "pareto-layerwise"


def _verdict(comparison: dict) -> list[str]:
    """Lines comparing the best searched merge with the best expert and the best grid point (held out)."""
    skills = comparison["objectives"]
    means = {label: sum(v[s] for s in skills) / len(skills) for label, v in comparison["scores"].items() if v}
    experts = {k: v for k, v in means.items() if k.startswith("expert:")}
    grid = {k: v for k, v in means.items() if k.startswith("uniform grid")}
    s_label = comparison.get("pick")  # the run's pick, chosen on calibration items only
    if not experts or s_label not in means:
        return ["(no completed search trial to compare)"]
    s_mean = means[s_label]
    e_label, e_mean = max(experts.items(), key=lambda kv: kv[1])
    lines = [f"mean held-out accuracy over {', '.join(skills)}:",
             f"  {s_label:38s} {100 * s_mean:5.1f}%",
             f"  best single expert ({e_label}){'':{max(0, 17 - len(e_label))}} {100 * e_mean:5.1f}%"]
    beats = s_mean > e_mean
    if grid:
        g_label, g_mean = max(grid.items(), key=lambda kv: kv[1])
        lines.append(f"  {g_label:38s} {100 * g_mean:5.1f}%")
        beats = beats and s_mean > g_mean
    verdict = "beats" if beats else "does NOT beat"
    lines.append(f"=> the searched merge {verdict} every single expert{' and the uniform grid' if grid else ''} "
                 "on the average of the skills.")
    return lines


#: ``evomerge demo --quick``: the first-run check (README command 1 in CI). The tiny zoo and a
#: dozen trials still make a real search, grid baseline and held-out comparison table, in about
#: two minutes on 2 cores from an empty cache.
QUICK = {"size": "tiny", "minutes": 2.0, "trials": 12}


def run_demo(size: str, run_dir: Path, minutes: float, trials: int | None = None, *, display: "Display",
             signals: "SignalLog") -> int:
    """Run the demo; returns the exit status (130/143 when interrupted: rerun to continue).

    ``trials`` caps the search's evaluations (default: the preset's 200); ``minutes`` caps its time.
    """
    from evomerge.experiments.zoo import build_zoo, format_accuracy_table, load_manifest

    from ._run import start

    click.echo(f"== 1/3  toy model zoo ({size}): a base model and one expert per skill")
    zoo = build_zoo(size)
    manifest = load_manifest(zoo)
    rows = ["base", *[f"expert:{s}" for s in manifest["experts"]]]
    click.echo(format_accuracy_table(manifest, [r for r in rows if r in manifest["accuracy"]]))
    click.echo(f"(exact-match accuracy on held-out items; zoo at {zoo})\n")

    budget = f"~{minutes:g} min" if trials is None else f"{trials} trials, at most {minutes:g} min"
    click.echo(f"== 2/3  searching per-layer TIES merges ({PRESET}, {budget}) + the uniform grid baseline")
    overrides = [f"models.zoo.size={size}", f"budget.wall_clock={minutes * 60:.0f}"]
    if trials is not None:
        overrides.append(f"budget.evaluations={trials}")
    code = start(spec=None, preset=PRESET, run_dir=run_dir, overrides=overrides, display=display, signals=signals)
    if code != 0:
        return code

    rd = RunDir(run_dir.resolve())
    click.echo("\n== 3/3  verdict (held-out items the search never saw)")
    comparison = json.loads(rd.comparison_file.read_text(encoding="utf-8"))
    for line in _verdict(comparison):
        click.echo(line)
    click.echo(
        f"\nwhere things are:\n"
        f"  run folder   {rd.path}\n"
        f"  report       {rd.report_file}   (open in a browser)\n"
        f"  the front    evomerge front {rd.path}\n"
        f"  export one   evomerge export {rd.path} --trial N --out merged/\n"
        f"  as a preset  evomerge run --preset {PRESET}   (see evomerge presets, docs/experiments.md)"
    )
    return 0

