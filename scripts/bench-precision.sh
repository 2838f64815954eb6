#!/usr/bin/env bash
# Training step time of the embedded shapes decoder (configs/shapes/decoder-finetune.toml: 32 px,
# channels [32, 64, 128], batch 32, from models/shapes) in run.precision = "f32" and "bf16"
# (autocast), on this machine's CPU, as a table with the ratio. Seconds per step over the steps
# after the first WARMUP, from loss.csv's `secs` column (start-up and validation not counted);
# the two precisions alternate ROUNDS times and each row is the median of its rounds.
#   scripts/bench-precision.sh              # STEPS=12 WARMUP=2 ROUNDS=2 THREADS=2 by default
#   PROFILE=release STEPS=20 scripts/bench-precision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-12} WARMUP=${WARMUP:-2} ROUNDS=${ROUNDS:-2} THREADS=${THREADS:-2}
PROFILE=${PROFILE:-dev}
flag=$([[ $PROFILE == release ]] && echo --release || echo)
cargo build $flag -p unclip-examples --bin train >&2
bin=target/$([[ $PROFILE == release ]] && echo release || echo debug)/train
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
per_step() { # seconds per step from a loss.csv
  awk -F, -v w="$WARMUP" 'NR == w + 1 { s0 = $1; t0 = $5 } NR > 1 { s = $1; t = $5 }
    END { printf "%.3f", (t - t0) / (s - s0) }' "$1"
}
declare -A times
for round in $(seq "$ROUNDS"); do
  for p in f32 bf16; do
    out="$work/$p-$round"
    "$bin" --config configs/shapes/decoder-finetune.toml --set "run.out=\"$out\"" \
      --set run.precision=$p --set run.threads="$THREADS" --set validation.items=0 \
      --set decoder.train.steps="$STEPS" --set decoder.train.checkpoint_every="$STEPS" >/dev/null
    times[$p]+="$(per_step "$out/decoder/loss.csv") "
  done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
f=$(median "${times[f32]}") b=$(median "${times[bf16]}")
echo "embedded decoder training step, batch 32, $THREADS threads, $((STEPS - WARMUP)) timed steps x $ROUNDS rounds ($(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
printf '| %-22s | %10s | %-24s |\n' "run.precision" "s / step" "rounds" \
  "----------------------" "----------" "------------------------" \
  "f32" "$f" "${times[f32]}" "bf16 (autocast)" "$b" "${times[bf16]}"
awk -v a="$f" -v b="$b" 'BEGIN { printf "bf16 / f32 step time: %.2f\n", b / a }'
grep -o -w -m1 'avx512_bf16\|amx_bf16' /proc/cpuinfo >/dev/null \
  && echo "the CPU has native bf16 instructions" || echo "the CPU has no avx512_bf16/amx_bf16: bf16 matmuls and convolutions are emulated"
