#!/usr/bin/env bash
# Create ./.venv (or $VENV) with the CPU build of torch and install this plugin with its test tools.
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first, pinned: its CPU wheel is small, and basicsr's sdist needs torch at build time.
"$VENV/bin/python" -m pip install --quiet torch==2.13.0 torchvision==0.28.0
"$VENV/bin/python" -m pip install --quiet --no-build-isolation -e '.[dev]'
# Compile the CPU kernels now (cached per torch and Python, see README "Compiled kernels"), not in the first test.
"$VENV/bin/python" -c 'from ssiu_arch.cpu import kernels; print(kernels.status_line())'
