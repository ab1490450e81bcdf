#!/usr/bin/env bash
# Sets up everything the test suite needs and runs it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
set +e
python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit "$rc"
