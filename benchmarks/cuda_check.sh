#!/usr/bin/env bash
# Prove the CUDA training path from a fresh checkout, in about 8 minutes on one GPU (most of it installing torch):
#   bash benchmarks/cuda_check.sh                     # creates .venv-cuda, then runs benchmarks/cuda_check.py
#   VENV=.venv bash benchmarks/cuda_check.sh --device cpu   # the same parts on the CPU, shortened (a dry run)
#   RUN=benchmarks/gpu_precision.py bash benchmarks/cuda_check.sh   # fp32/fp16/bf16 inference in the same venv
#   WHEELS=wheels bash benchmarks/cuda_check.sh       # a GPU machine without internet: packages from a folder
#                                                     # that benchmarks/cuda_wheels.sh filled on one with it
# Arguments go to the script RUN names (default benchmarks/cuda_check.py; see its --help).
# The environment: a venv that sees the interpreter's packages, so a CUDA torch already on the machine is used.
# GPU images often ship torch in a venv of their own: where PYTHON is a venv's interpreter, a .pth file makes that
# venv's packages visible too. torch and torchvision are installed (from PyPI, whose Linux wheels are CUDA builds)
# only where torch is missing or cannot see the machine's NVIDIA GPU. Then the modules the checks import are tried, and only the missing
# ones are installed: an image's OpenCV, say, is often opencv-python-headless, which pip would not count as the
# opencv-python this package asks for. basicsr goes in without its declared dependencies: it never imports addict,
# future, yapf or scikit-image, and its opencv-python would be a second OpenCV; it is an sdist that needs torch at
# build time, hence --no-build-isolation (as in scripts/setup.sh). The CPU inference kernels are not built
# (SSIU_NO_KERNELS=1): CUDA never uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}
RUN=${RUN:-benchmarks/cuda_check.py}
export SSIU_NO_KERNELS=1
start=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  # Without ensurepip (a distribution's Python without its venv package), pip comes from the outer packages.
  "$PYTHON" -m venv --system-site-packages "$VENV" 2>/dev/null ||
    "$PYTHON" -m venv --system-site-packages --without-pip --clear "$VENV"
  "$PYTHON" -c 'import site, sys
if sys.prefix != sys.base_prefix:  # a venv: addsitedir also reads its .pth files
    print("\n".join(f"import site; site.addsitedir({path!r})" for path in site.getsitepackages()))' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/outer_venv.pth"
fi
PY="$VENV/bin/python"
pip_install=("$PY" -m pip install --quiet --no-build-isolation)
if [ -n "${WHEELS:-}" ]; then
  pip_install+=(--no-index --find-links "$WHEELS")
fi
if ! "$PY" -c 'import torch' 2>/dev/null ||
   { command -v nvidia-smi >/dev/null && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; }; then
  "${pip_install[@]}" torch==2.13.0 torchvision==0.28.0
fi
# This package, editable, with its console scripts (ssiu_arch itself would import from the checkout without them).
[ -x "$VENV/bin/basicsr" ] || "${pip_install[@]}" --no-deps -e .
# The first missing module of what the checks import (ssiu_arch.models applies the BasicSR fixes first), as the
# distribution that provides it; nothing once all import.
missing() {
  "$PY" -c 'import sys
sys.path.insert(0, "benchmarks")
try:
    import ssiu_arch.models, ssiu_arch.tools.cli, ssiu_arch.tools.train, basicsr.train, bench_train, gpu_precision
except ModuleNotFoundError as err:
    module = err.name.partition(".")[0]
    print({"cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image"}.get(
        module, module))'
}
tried=()
while package=$(missing) && [ -n "$package" ]; do
  if [[ " ${tried[*]} " == *" $package "* ]]; then
    echo "cuda_check.sh: $package still does not import after installing it" >&2
    exit 1
  fi
  tried+=("$package")
  if [ "$package" = torchvision ]; then
    echo "cuda_check.sh: torchvision does not import: install the build that matches $("$PY" -c 'import torch; print("torch", torch.__version__)')" >&2
    exit 1
  elif [ "$package" = basicsr ]; then
    "${pip_install[@]}" --no-deps basicsr==1.4.2
  else
    "${pip_install[@]}" "$package"
  fi
done
echo "environment ready in $((SECONDS - start)) s${tried[*]:+ (installed: ${tried[*]})}:" \
  "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())')"
"$PY" "$RUN" "$@"
echo "cuda_check.sh: $((SECONDS - start)) s in all"
