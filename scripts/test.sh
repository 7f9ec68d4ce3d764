#!/usr/bin/env bash
# Run the test suite (slow tests excluded; pass `-m slow` or other pytest arguments to change that).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ $# -eq 0 ]; then
    set -- -m "not slow"
fi
exec .venv/bin/python -m pytest "$@"
