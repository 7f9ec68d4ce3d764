#!/usr/bin/env bash
# Create .venv (once) and install what one command needs, saying what it does:
#   bash scripts/setup.sh demo   simfluence with the report extra (what scripts/demo.sh uses)
#   bash scripts/setup.sh test   simfluence with the test extras and Debian's chromium (default)
# torch is pinned to the CPU build where no torch is present: an unpinned `torch` would pull a
# multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test}
case "$PROFILE" in
    demo) EXTRAS="report" ;;
    test) EXTRAS="test" ;;
    *) echo "setup: unknown profile '$PROFILE' (use demo or test)" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
timed() {   # timed DESCRIPTION COMMAND...: run quietly, then say how long it took and how big .venv is
    local start=$SECONDS
    say "$1 ..."
    shift
    "$@"
    say "  done in $((SECONDS - start)) s (.venv is now $(du -sh .venv 2>/dev/null | cut -f1))"
}
if [ ! -x .venv/bin/python ]; then
    timed "creating .venv with $("$PYTHON" --version 2>&1)" "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    timed "installing torch 2.13.0, the CPU build (about 0.2 GB to download, 0.75 GB installed)" \
        .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
stamp=.venv/.simfluence-installed-$PROFILE
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    timed "installing simfluence with the '$EXTRAS' extra" \
        .venv/bin/pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
    if [ "$PROFILE" = test ]; then
        # kronfluence (the EK-FAC peer) without its unused torchvision dependency; see pyproject.toml.
        timed "installing kronfluence 1.0.1 (its other dependencies came with the test extra)" \
            .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "kronfluence==1.0.1"
    fi
    touch "$stamp"
fi
[ "$PROFILE" = test ] || exit 0
# The HTML report's test opens the page in Debian's headless Chromium (Playwright drives it;
# it downloads no browser of its own). SIMFLUENCE_NO_CHROMIUM=1 skips this, and those tests skip.
# Best effort: without root, it says it will use sudo first; if that fails, those tests skip outside CI.
if [ ! -x /usr/bin/chromium ] && [ -z "${SIMFLUENCE_NO_CHROMIUM:-}" ] && command -v apt-get >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo=sudo
        say "Debian's chromium (for the report's browser test) needs root: running 'sudo apt-get install chromium'" \
            "(set SIMFLUENCE_NO_CHROMIUM=1 to skip)"
    fi
    start=$SECONDS
    say "installing Debian's chromium for the report's browser test ..."
    if { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        say "  done in $((SECONDS - start)) s"
    else
        say "could not install Debian's chromium; the report's browser tests will skip"
    fi
fi
