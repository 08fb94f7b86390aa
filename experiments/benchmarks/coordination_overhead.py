"""Coordination overhead of several workers sharing one search (docs/scale-out.md).

Starts ``--workers`` `evomerge worker` processes on the small zoo against ``--storage`` (a
PostgreSQL URL; each run uses a fresh study) and prints, over the workers, the evaluation time
per trial (real evaluations: ``--calib-size`` items per skill, several seconds each while the
workers share the cores) and the coordination time per trial: optimizer + ledger (stale-trial
check when due, the budget's looks, ``study.ask`` and its genome, the heartbeat's first beat,
decode, the trial's writes and ``study.tell``); waiting for work is not counted.

    python -m evomerge.experiments.benchmarks.coordination_overhead --storage postgresql+psycopg2://... \\
        --workers 4 --trials 48 --optimizer optuna:tpe --calib-size 64

Target (issue 15): <= 100 ms per trial with 4 workers on PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

from evomerge.experiments.zoo import load_manifest

ZOO = Path.home() / ".cache" / "evomerge" / "zoo" / "small-llama-seed0"
_LINE = re.compile(r"worker \S+: (\d+) trials, \d+ claims given back, evaluation ([\d.]+) s, coordination ([\d.]+) s")


def _spec(folder: Path, trials: int, optimizer: str, calib: int, options: dict | None = None) -> Path:
    library, _, name = optimizer.partition(":")
    spec = {
        "name": "coordination-overhead",
        "models": {"zoo": {"size": "small", "path": str(ZOO)}},
        "space": {"method": "ties", "params": ["weight", "density"], "granularity": "layer"},
        "objectives": [
            {"name": s, "metric": "exact_match", "data": f"zoo:data/{s}/calib.jsonl", "size": calib}
            for s in load_manifest(ZOO)["skills"]
        ],
        "scorer": {"batch_size": 64, "max_new_tokens": 8},
        "stages": [{"name": f"overhead-{uuid.uuid4().hex[:8]}",
                    "optimizer": {"library": library, "name": name, "options": options or {}},
                    "budget": {"evaluations": trials}}],
        "budget": {"evaluations": trials},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="PostgreSQL URL shared by the workers")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--optimizer", default="optuna:tpe", help="optuna:<sampler> or nevergrad:<Class>")
    parser.add_argument("--calib-size", type=int, default=64, help="items per skill (evaluation cost)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an optimizer option (YAML value), e.g. multivariate=false; repeatable")
    args = parser.parse_args()
    options = {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in args.option)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(Path(tmp), args.trials, args.optimizer, args.calib_size, options)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "evomerge.experiments.cli", "worker", str(spec), "--storage", args.storage,
                 "--worker-id", f"bench{i}", "--queue", str(args.workers), "--quiet"],
                env=env, stdout=subprocess.PIPE, text=True,
            )
            for i in range(args.workers)
        ]
        outputs = [p.communicate()[0] for p in procs]
    n = evaluation = coordination = 0.0
    for out in outputs:
        match = _LINE.search(out)
        if match is None:
            raise SystemExit(f"a worker failed:\n{out}")
        n += int(match[1])
        evaluation += float(match[2])
        coordination += float(match[3])
    print(f"{args.optimizer} {options or ''}, {args.workers} workers, {int(n)} trials, {args.calib_size} items/skill")
    print(f"evaluation   {evaluation / n * 1000:8.1f} ms/trial")
    print(f"coordination {coordination / n * 1000:8.1f} ms/trial")
    print(f"overhead     {100 * coordination / evaluation:8.2f} % of evaluation time (target: <= 100 ms per trial)")


if __name__ == "__main__":
    main()
