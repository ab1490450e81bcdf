#!/usr/bin/env bash
# Creates ./.venv with the node and its Python dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: these releases lie on the build machines' disk; an open
# range lets pip reach for a multi-GB build from the registry instead.
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install --quiet -e ".[test,postgres]"
echo "setup: ok ($(python -c 'import torch; print("torch", torch.__version__)'))"
