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
# That build (with its CUDA libraries) takes about 5.5 GB in .venv; say so up front, so
# that a full disk reads as a full disk and not as a broken package.
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "setup: installing torch 2.14.1 and torchvision 0.29.1 (about 5.5 GB);" \
        "free here: $(df -Ph . | awk 'NR==2 {print $4}')"
    if ! python -m pip install --quiet --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"; then
        df -Ph . >&2
        echo "setup: could not install torch; if pip said 'No space left on device'," \
            "free at least 6 GB on $(df -P . | awk 'NR==2 {print $6}') and run again" >&2
        exit 1
    fi
fi
python -m pip install --quiet -e ".[test,postgres]"
echo "setup: ok ($(python -c 'import torch; print("torch", torch.__version__)'))"
