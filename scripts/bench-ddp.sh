#!/usr/bin/env bash
# Data-parallel scaling of a training step on the CPU (STAGE=decoder by default, clip or
# upsampler): samples/s at world size 2 (2 processes x 1 libtorch thread, `train --nproc 2`)
# against world size 1 (1 process x 2 threads), same config and global batch, printed as a
# table with the ratio (scaling efficiency). Rate = global batch x steps / seconds over the
# steps after the first WARMUP ones, from rank 0's loss.csv (its `secs` column), so start-up
# and validation are not counted.
#   scripts/bench-ddp.sh                 # STEPS=24 BATCH=8 WARMUP=4 by default
#   STEPS=40 BATCH=16 scripts/bench-ddp.sh
#   STAGE=clip scripts/bench-ddp.sh     # CLIP: the loss over the all-gathered global batch
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-24} BATCH=${BATCH:-8} WARMUP=${WARMUP:-4} PROFILE=${PROFILE:-release}
STAGE=${STAGE:-decoder}
case $STAGE in decoder | clip | upsampler) ;; *)
  echo "STAGE=$STAGE: expected decoder, clip or upsampler" >&2
  exit 2
  ;;
esac
flag=$([[ $PROFILE == release ]] && echo --release || echo)
cargo build $flag -p unclip-examples --bin train >&2
bin=target/$([[ $PROFILE == release ]] && echo release || echo debug)/train
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/run.toml" <<TOML
[run]
out = "$work/out"
seed = 1
conditioning = "$PWD/models/shapes"
[data]
source = "webdataset"
path = "$PWD/fixtures/dataset/webdataset"
[validation]
items = 0
$(case $STAGE in
decoder) cat <<T
[decoder]
resolution = 32
[decoder.model]
channels = [32, 64]
layers_per_block = 1
attention_head_dim = 16
norm_groups = 8
T
;;
clip) cat <<T
[clip]
[clip.model]
width = 64
layers = 2
heads = 4
image_size = 32
patch_size = 4
T
;;
upsampler) cat <<T
[upsampler]
low_resolution = 16
resolution = 32
crop = 16
blur_sigma = 0.6
[upsampler.model]
channels = [32, 64]
layers_per_block = 1
norm_groups = 8
T
;;
esac)
[$STAGE.train]
steps = $STEPS
batch_size = $BATCH
lr = 1e-4
checkpoint_every = $STEPS
TOML
rate() { # samples/s from a loss.csv
  awk -F, -v w="$WARMUP" -v b="$BATCH" 'NR == w + 1 { s0 = $1; t0 = $5 } NR > 1 { s = $1; t = $5 }
    END { printf "%.2f", b * (s - s0) / (t - t0) }' "$1"
}
"$bin" --config "$work/run.toml" --set "run.out=\"$work/ws1\"" --set run.threads=2 >/dev/null
"$bin" --config "$work/run.toml" --set "run.out=\"$work/ws2\"" --nproc 2 >/dev/null
"$bin" --config "$work/run.toml" --set "run.out=\"$work/ws1t1\"" --set run.threads=1 >/dev/null
r0=$(rate "$work/ws1t1/$STAGE/loss.csv")
r1=$(rate "$work/ws1/$STAGE/loss.csv")
r2=$(rate "$work/ws2/$STAGE/loss.csv")
echo "$STAGE step (config in this script), global batch $BATCH, $((STEPS - WARMUP)) timed steps ($(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"
printf '| %-26s | %10s |\n' "layout" "samples/s"
printf '|%s|%s|\n' "----------------------------" "------------"
printf '| %-26s | %10s |\n' "world 1 x 1 thread" "$r0" "world 1 x 2 threads" "$r1" \
  "world 2 x 1 thread (Gloo)" "$r2"
awk -v a="$r1" -v b="$r2" 'BEGIN { printf "scaling efficiency (world 2 / world 1): %.2f\n", b / a }'
