#!/usr/bin/env bash
# The scGPT-sized train step on an NVIDIA GPU: ms/step and model FLOP utilisation.
#
#   bash bench/gpu.sh                 # embsize 512, 12 layers, 8 heads, seq 1536, batch 64,
#                                     # bf16, cuDNN attention, dropout 0, 30 timed steps
#   bash bench/gpu.sh --steps 50      # any bench/gpu_bench.py option passes through
#   bash bench/gpu.sh --cpu-smoke     # tiny sizes on the CPU: checks the script itself
#
# When jax has no GPU backend, installs the CUDA 12 build of the installed jax version
# (pip install "jax[cuda12]==<version>"). PYTHON selects the interpreter (default: the first
# of python, python3 that imports jax; GPU images often have only python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import jax' >/dev/null 2>&1; then
      PY="$candidate"
      break
    fi
  done
  PY="${PY:-python3}"
fi

for arg in "$@"; do
  if [ "$arg" = "--cpu-smoke" ]; then
    exec env JAX_PLATFORMS=cpu "$PY" bench/gpu_bench.py "$@"
  fi
done

backend() { "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo "none"; }

if [ "$(backend)" != "gpu" ]; then
  version="$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)"
  spec="jax[cuda12]${version:+==$version}"
  echo "gpu.sh: jax's backend is '$(backend)', not gpu; installing $spec ..."
  if ! "$PY" -m pip install --quiet "$spec"; then
    echo "gpu.sh: could not install $spec (no network?). Install a CUDA build of jax" \
         "(pip install \"$spec\") and rerun." >&2
    exit 2
  fi
  if [ "$(backend)" != "gpu" ]; then
    echo "gpu.sh: jax still sees no GPU after installing $spec; check the NVIDIA driver" \
         "(nvidia-smi) and CUDA_VISIBLE_DEVICES." >&2
    exit 2
  fi
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_bench.py "$@"
