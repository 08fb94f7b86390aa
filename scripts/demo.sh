#!/usr/bin/env bash
# README command 1: set up a virtual environment (no test extras) and run the demo on the toy zoo.
#   bash scripts/demo.sh [evomerge demo options]      e.g. --quick (tiny zoo, 12 trials: the CI form)
# EVOMERGE_VENV picks the environment's folder (default .venv; CI uses a fresh .venv-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${EVOMERGE_VENV:-.venv}
bash scripts/setup-env.sh "$venv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/evomerge" demo "$@"
