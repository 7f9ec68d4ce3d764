#!/usr/bin/env bash
# Run the test suite (slow tests excluded; pass `-m slow` or other pytest arguments to change that).
# Without arguments it also lists the 15 slowest tests, so CI's time budget can be watched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ $# -eq 0 ]; then
    set -- -m "not slow" --durations=15
fi
exec .venv/bin/python -m pytest "$@"
