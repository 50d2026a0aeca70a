#!/usr/bin/env bash
# Fill a folder with the wheels that benchmarks/cuda_check.sh installs on a GPU machine without internet access:
#   bash benchmarks/cuda_wheels.sh [DIR [PYTHON_VERSION]]     # defaults: wheels, 3.12
# then, on the GPU machine, from the repository root:  WHEELS=DIR bash benchmarks/cuda_check.sh
# It holds what a CUDA image usually lacks of what the checks import, at the versions of scripts/constraints.txt,
# for x86-64 Linux and the GPU machine's Python: basicsr, an sdist that this checkout's venv (which has torch, see
# scripts/setup.sh) builds into a pure-Python wheel, and lmdb, einops, safetensors, tqdm, PyYAML, Pillow and
# filelock (about 10 MB in all). torch, torchvision, NumPy, OpenCV, SciPy and matplotlib must be on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
VERSION=${2:-3.12}
BUILD_PYTHON=${BUILD_PYTHON:-.venv/bin/python}
pins=()
for name in lmdb einops safetensors tqdm PyYAML pillow filelock; do
  pins+=("$(grep -i "^$name==" scripts/constraints.txt)")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$DIR"
"$BUILD_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$VERSION" \
  "${platforms[@]}" --dest "$DIR" "${pins[@]}"
"$BUILD_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DIR" \
  "$(grep -i '^basicsr==' scripts/constraints.txt)"
ls -l "$DIR"
