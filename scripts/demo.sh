#!/usr/bin/env bash
# README command 1: set up .venv and run the demo on the toy zoo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh .venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/evomerge demo "$@"
