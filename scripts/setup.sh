#!/usr/bin/env bash
# Create ./.venv (or $VENV) with the CPU build of torch and install this plugin with every extra and its test
# tools, at the versions of scripts/constraints.txt. Safe to re-run: it only installs what is missing.
# PYTHON picks the interpreter (default python3): 3.10, 3.11 or 3.12 (tested: 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] && PYTHON="$VENV/bin/python"
if ! version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "scripts/setup.sh: cannot run $PYTHON; set PYTHON to a Python 3.10-3.12 interpreter" >&2
    exit 1
fi
case "$version" in
    3.10 | 3.11 | 3.12) ;;
    *)
        echo "scripts/setup.sh: Python $version is not supported: basicsr 1.4.2 builds on 3.10-3.12 only" \
             "(tested: 3.11); run PYTHON=python3.11 bash scripts/setup.sh" >&2
        exit 1 ;;
esac
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
install=("$VENV/bin/python" -m pip install --quiet -c scripts/constraints.txt)
# torch first: its CPU wheel is small, and basicsr's sdist needs torch at build time.
"${install[@]}" torch torchvision
"${install[@]}" --no-build-isolation -e '.[dev]'
# Compile the CPU kernels now (cached per torch and Python, see README "Compiled kernels"), not in the first test.
"$VENV/bin/python" -c 'from ssiu_arch.cpu import kernels; print(kernels.status_line())'
