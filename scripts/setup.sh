#!/usr/bin/env bash
# Create .venv (once) and install simfluence with its test dependencies into it.
# torch is pinned to the CPU build where no torch is present: an unpinned `torch`
# would pull a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
stamp=.venv/.simfluence-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi
# The HTML report's test opens the page in Debian's headless Chromium (Playwright drives it;
# it downloads no browser of its own). SIMFLUENCE_NO_CHROMIUM=1 skips this, and those tests skip.
# Best effort: without root or sudo, say so and go on (the browser tests then skip outside CI).
if [ ! -x /usr/bin/chromium ] && [ -z "${SIMFLUENCE_NO_CHROMIUM:-}" ] && command -v apt-get >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo=sudo
    fi
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "setup: could not install Debian's chromium; the report's browser tests will skip" >&2
    fi
fi
