#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs evomerge into it.
#   scripts/setup-env.sh VENV_DIR [EXTRAS]      e.g. scripts/setup-env.sh .venv test
#
# torch policy (never pull CUDA builds onto a CPU machine):
#   - EVOMERGE_TORCH_SPEC set          -> pip install "$EVOMERGE_TORCH_SPEC" (your choice, e.g. a CUDA index)
#   - python3 already imports torch    -> the venv sees it (--system-site-packages): your torch stays
#   - an NVIDIA GPU is visible         -> pip install torch (PyPI's default, CUDA) build
#   - otherwise                        -> pip install torch==2.13.0 (the CPU wheel on this machine kind)
# The installed torch version is then pinned as a constraint, so no other package can replace it.
set -euo pipefail
venv=${1:?usage: setup-env.sh VENV_DIR [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    if "$py" -c "import torch" 2>/dev/null; then
        echo "[setup] using the torch already installed for $py"
        "$py" -m venv --system-site-packages "$venv"
    else
        "$py" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${EVOMERGE_TORCH_SPEC:-}" ]; then
        spec=$EVOMERGE_TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec=torch
    else
        spec=torch==2.13.0
    fi
    echo "[setup] installing $spec"
    "${pip[@]}" install "$spec"
fi
torch_version=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

target="$here"
[ -n "$extras" ] && target="$here[$extras]"
echo "[setup] installing evomerge${extras:+[$extras]} (torch $torch_version kept)"
"${pip[@]}" install -c "$constraints" "$target"
