#!/usr/bin/env bash
# Provides libtorch for tch 0.26 (PyTorch 2.13.0) with nothing but PyPI.
#
# - If LIBTORCH is set in the environment, or LIBTORCH_USE_PYTORCH=1 (tch then asks the active
#   Python's torch), that libtorch is used and nothing is installed.
# - Otherwise a project-local virtual environment .venv is created (only when missing), torch==2.13.0
#   is installed in it (only when missing; the wheel carries the CUDA 13 libraries, ~5 GB), and
#   .venv/libtorch is linked to the torch package, which .cargo/config.toml names as LIBTORCH.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
if [[ -n "${LIBTORCH:-}" || -n "${LIBTORCH_USE_PYTORCH:-}" ]]; then
  echo "setup-libtorch: using the libtorch you provided (LIBTORCH=${LIBTORCH:-} LIBTORCH_USE_PYTORCH=${LIBTORCH_USE_PYTORCH:-})"
  exit 0
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup-libtorch: creating .venv"
  "$PY" -m venv .venv
fi
have=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [[ "$have" != "$TORCH_VERSION" ]]; then
  echo "setup-libtorch: installing torch==$TORCH_VERSION into .venv (about 5 GB, a few minutes)"
  # pip's wheel cache would hold a second copy of the ~3 GB of wheels, and its unpacking goes to
  # TMPDIR, which may be a small tmpfs: keep both out of the way so that ~8 GB free is enough.
  free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
  if [[ -n "$free_kb" && "$free_kb" -lt $((8 * 1024 * 1024)) ]]; then
    echo "setup-libtorch: warning: only $((free_kb / 1024)) MB free here; torch needs about 8 GB while installing" >&2
  fi
  mkdir -p .venv/tmp
  TMPDIR="$PWD/.venv/tmp" .venv/bin/pip install --quiet --no-cache-dir "torch==$TORCH_VERSION"
  rm -rf .venv/tmp
fi
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
# unclip-dist's NCCL backend compiles against CUDA's headers: the wheel's nvidia packages carry the
# runtime's and NCCL's but not crt/ and nv/, which come in two header-only packages of the same CUDA.
cuda_inc="$(dirname "$torch_dir")/nvidia/cu13/include"
if [[ -f "$torch_dir/lib/libtorch_cuda.so" && -f "$cuda_inc/cuda_runtime_api.h" \
      && ! ( -f "$cuda_inc/crt/host_config.h" && -e "$cuda_inc/nv/target" ) ]]; then
  cuda=$(.venv/bin/python -c 'import importlib.metadata as m; print(".".join(m.version("nvidia-cuda-runtime").split(".")[:2]))')
  echo "setup-libtorch: installing CUDA $cuda's crt and cccl headers (for unclip-dist's NCCL backend)"
  .venv/bin/pip install --quiet --no-cache-dir --no-deps "nvidia-cuda-crt==$cuda.*" "nvidia-cuda-cccl==$cuda.*"
fi
if [[ "$(readlink .venv/libtorch 2>/dev/null || true)" != "$torch_dir" ]]; then
  ln -sfn "$torch_dir" .venv/libtorch
fi
echo "setup-libtorch: libtorch $TORCH_VERSION at .venv/libtorch -> $torch_dir"
