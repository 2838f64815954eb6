#!/usr/bin/env bash
# Copies a model folder and puts a stage checkpoint's EMA weights into the copy as f16: what
# `train export` writes for a finished run, for a checkpoint of a run that is not finished (README,
# embedded model: round 10's rows "after 2000 / 5500 more steps", round 12's decoder checkpoints).
# A prior checkpoint holds the prior's tensors under their own names; a decoder checkpoint holds
# `decoder.*` and `text_proj.*`, one component folder each. Every component's tensor names must
# match the base folder's. Needs .venv (scripts/setup-libtorch.sh) for torch, plus safetensors
# and numpy (`.venv/bin/pip install numpy safetensors`; the setup does not install them).
#
#   scripts/experiments/checkpoint-to-folder.sh runs/r10/prior/prior/step-00005500 models/shapes runs/r10/m-p5500
#   scripts/experiments/checkpoint-to-folder.sh runs/r12/dec/decoder/step-00001000 runs/r12/m-chain runs/r12/m-d1000
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 CHECKPOINT_DIR BASE_FOLDER OUT_FOLDER" >&2; exit 2; }
ckpt=$1 base=$2 out=$3
[ -f "$ckpt/ema.safetensors" ] || { echo "$ckpt/ema.safetensors: not found" >&2; exit 1; }
[ -e "$out" ] && { echo "$out exists; not overwriting" >&2; exit 1; }
.venv/bin/python -c "import numpy, safetensors.torch" 2>/dev/null ||
    { echo ".venv lacks torch, safetensors or numpy: run make setup, then .venv/bin/pip install numpy safetensors" >&2; exit 1; }
# The stage is the checkpoint's parent folder's name (runs/X/<stage>/step-N).
stage=$(basename "$(dirname "$ckpt")")
[ -d "$base/$stage" ] || { echo "$base/$stage: not a folder (stage $stage)" >&2; exit 1; }
cp -r "$base" "$out"
.venv/bin/python - "$ckpt/ema.safetensors" "$out" "$stage" <<'PY' || { rm -rf "$out"; echo "$out: not written" >&2; exit 1; }
import os, sys
from safetensors.torch import load_file, save_file
src, out, stage = sys.argv[1:]
ema = load_file(src)
name = "diffusion_pytorch_model.safetensors"
# Split by component when every name starts with a component folder of the base (decoder.*,
# text_proj.*); else the whole file is the stage's one component (the prior).
heads = {k.partition(".")[0] for k in ema}
if all(os.path.isdir(os.path.join(out, h)) for h in heads):
    parts = {h: {k.partition(".")[2]: v for k, v in ema.items() if k.partition(".")[0] == h} for h in heads}
else:
    parts = {stage: ema}
for comp, tensors in parts.items():
    dst = os.path.join(out, comp, name)
    if set(tensors) != set(load_file(dst)):
        sys.exit(f"{src}: {comp}'s tensor names differ from {dst}")
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in tensors.items()}, dst)
    print(f"{dst}: {len(tensors)} tensors")
PY
echo "$out: $stage from $ckpt"
