#!/usr/bin/env bash
# Prove the CUDA training path from a fresh checkout, in about 8 minutes on one GPU (most of it installing torch):
#   bash benchmarks/cuda_check.sh                     # creates .venv-cuda, then runs benchmarks/cuda_check.py
#   VENV=.venv bash benchmarks/cuda_check.sh --device cpu   # the same parts on the CPU, shortened (a dry run)
#   RUN=benchmarks/gpu_precision.py bash benchmarks/cuda_check.sh   # fp32/fp16/bf16 inference in the same venv
# Arguments go to the script RUN names (default benchmarks/cuda_check.py; see its --help). The environment: a venv that sees system packages,
# so a CUDA torch already installed on the machine is used; otherwise torch comes from PyPI, whose Linux wheels
# are CUDA builds. basicsr is an sdist that needs torch at build time, hence --no-build-isolation (as in
# scripts/setup.sh). The CPU inference kernels are not built (SSIU_NO_KERNELS=1): CUDA never uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}
RUN=${RUN:-benchmarks/cuda_check.py}
export SSIU_NO_KERNELS=1
start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c 'import sys, torch, torchvision; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0 torchvision==0.28.0
fi
if ! "$PY" -c 'import ssiu_arch.models' 2>/dev/null; then
  if "$PY" -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.13.0")'; then
    "$PY" -m pip install --quiet --no-build-isolation -e '.[basicsr]'
  else  # another torch is installed: keep it, install the rest of the requirements around it
    "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
    mapfile -t requirements < <("$PY" -c '
from importlib.metadata import requires
for req in requires("ssiu"):
    name, _, marker = req.partition(";")
    if ("extra ==" not in marker or "basicsr" in marker) and not name.startswith(("torch>", "torchvision>")):
        print(name.strip())')
    "$PY" -m pip install --quiet --no-build-isolation "${requirements[@]}"
  fi
fi
echo "environment ready in $((SECONDS - start)) s: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())')"
"$PY" "$RUN" "$@"
echo "cuda_check.sh: $((SECONDS - start)) s in all"
