#!/usr/bin/env bash
# Copies a model folder and puts a prior checkpoint's EMA weights into the copy as f16: what
# `train export` writes for a finished run, for a checkpoint of a run that is not finished (README,
# embedded model, round 10: the rows "after 2000 / 5500 more steps" and round 9's stopped run).
# Needs .venv (scripts/setup-libtorch.sh) for torch and safetensors.
#
#   scripts/experiments/checkpoint-prior-to-folder.sh runs/r10/prior/prior/step-00005500 models/shapes runs/r10/m-p5500
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 CHECKPOINT_DIR BASE_FOLDER OUT_FOLDER" >&2; exit 2; }
ckpt=$1 base=$2 out=$3
[ -f "$ckpt/ema.safetensors" ] || { echo "$ckpt/ema.safetensors: not found" >&2; exit 1; }
[ -e "$out" ] && { echo "$out exists; not overwriting" >&2; exit 1; }
cp -r "$base" "$out"
.venv/bin/python - "$ckpt/ema.safetensors" "$out/prior/diffusion_pytorch_model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
ema, dst = load_file(sys.argv[1]), sys.argv[2]
if set(ema) != set(load_file(dst)):
    sys.exit(f"{sys.argv[1]}: tensor names differ from {dst}")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in ema.items()}, dst)
PY
echo "$out: prior from $ckpt"
