#!/usr/bin/env bash
# Can a model folder's CLIP tell an evaluation's images with the right object count from those
# without? Embeds the PNGs of an `evaluate --out` folder with the `embed` example (prompts as
# captions) and prints the mean prompt-image cosine of the images whose count the checker
# graded right and of the rest. With a second folder, also the cosine between the two image
# towers' embeddings of each image (how far a fine-tuned tower moved). README, round 14. Needs
# .venv with numpy and safetensors (`.venv/bin/pip install numpy safetensors`).
#
#   scripts/experiments/count-cosines.sh runs/r13/two-r12 models/shapes
#   scripts/experiments/count-cosines.sh runs/r13/two-r12 runs/r14/m-count models/shapes
set -euo pipefail
[ $# -eq 2 ] || [ $# -eq 3 ] || { echo "usage: $0 EVAL_DIR MODEL [OTHER_MODEL]" >&2; exit 2; }
eval_dir=$1
[ -f "$eval_dir/grades.tsv" ] || { echo "$eval_dir/grades.tsv: not found" >&2; exit 1; }
.venv/bin/python -c "import numpy, safetensors" 2>/dev/null ||
    { echo ".venv lacks numpy or safetensors: .venv/bin/pip install numpy safetensors" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/images"
# grades.tsv: image, kind, prompt, wrong checks, ...; one PNG and caption per row.
tail -n +2 "$eval_dir/grades.tsv" | while IFS=$'\t' read -r img _ prompt _; do
    cp "$eval_dir/$img.png" "$tmp/images/$img.png"; printf '%s\n' "$prompt" > "$tmp/images/$img.txt"
done
cargo build --release --example embed -q
shift
n=0
for model in "$@"; do
    target/release/examples/embed --folder "$tmp/images" --model "$model" --out "$tmp/emb$n" --workers 1 >/dev/null
    n=$((n + 1))
done
.venv/bin/python - "$eval_dir/grades.tsv" "$tmp" "$n" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
grades, tmp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [l.split("\t") for l in open(grades).read().splitlines()[1:]]
wrong = {r[0]: "count" in r[3].split(",") for r in rows}
names = sorted(wrong)  # the image folder's order
unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
emb = [load_file(f"{tmp}/emb{k}/00000.safetensors") for k in range(n)]
img, txt = unit(emb[0]["image_embeds"]), unit(emb[0]["text_embeds"])
cos = (img * txt).sum(1)
bad = np.array([wrong[x] for x in names])
print(f"prompt-image cosine: count right {cos[~bad].mean():.3f} ({(~bad).sum()} images), "
      f"count wrong {cos[bad].mean():.3f} ({bad.sum()})")
if n == 2:
    moved = (img * unit(emb[1]["image_embeds"])).sum(1)
    print(f"first vs second image tower: mean cosine {moved.mean():.3f}, "
          f"{moved[~bad].mean():.3f} on the images with the right count")
PY
