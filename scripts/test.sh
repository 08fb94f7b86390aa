#!/usr/bin/env bash
# README command 2 (and CI): set up .venv with the test extras and run the test suite against the
# installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh .venv test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
