#!/usr/bin/env bash
# README command 2 (and CI): set up .venv with the test extras and run the test suite against the
# installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
# The scale-out tests start a private PostgreSQL cluster: install Debian's server when it is missing.
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "[setup] installing Debian's postgresql package"
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q postgresql >/dev/null
fi
# The report test renders report.html in headless Chromium: install Debian's when it is missing.
if ! command -v chromium >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium package"
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null
fi
bash scripts/setup-env.sh .venv test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# One pytest worker per core, a test file per worker at a time (module fixtures are built once):
# the suite is mostly single-threaded (CLI processes, optuna, small models). EVOMERGE_TEST_WORKERS=0
# runs it in one process.
exec .venv/bin/python -m pytest -n "${EVOMERGE_TEST_WORKERS:-auto}" --dist loadfile "$@"
