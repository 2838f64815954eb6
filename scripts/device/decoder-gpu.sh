#!/bin/bash
# One device call: a smoke run of two decoder fine-tunes side by side (rate), then the real runs
# sized to the time left, then f16 copies of their model folders and a tar of each run into $OUT
# (the device tool brings back at most 16 MiB a file: the f32 weights and checkpoints stay there).
# The binary is gpu/train from scripts/device/build-train.sh; the device call that ran it:
#   run(command="bash scripts/device/decoder-gpu.sh 2>&1 | tee $OUT/log.txt", carry=["gpu"], timeout_s=560)
# Back here: tar -xf r32.tar -C runs/gpu/r32, then `train export` with run.out=runs/gpu/r32.
# The two runs are named N1 and N2, with their own flags X1 and X2 after the shared ones; the
# defaults are round 7's first call (as run, but for three fixes made after it: `tail -n`, the
# run's validation grid kept in the tar, the path to the repo root from scripts/device).
# Round 8's call (two 32 px runs from the shipped decoder, the second with more two-object scenes):
#   T=520 N1=a32 X1="--set decoder.train.batch_size=256 --set run.seed=9" \
#   N2=b32 X2="--set decoder.train.batch_size=256 --set run.seed=10 --set data.kind_weights=[25,30,35,10]" \
#   bash scripts/device/decoder-gpu.sh   (timeout_s=600)
# The second call of round 7 (the 32 px run alone, from the first's model folder) is the README's
# third command with decoder.init=/tmp/r32/decoder/model, sized the same way.
set -u
T=${T:-420}
cd "$(dirname "$0")/../.."
TL=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
export LD_LIBRARY_PATH=$TL:${LD_LIBRARY_PATH:-}
B=gpu/train; chmod +x $B  # scripts/device/build-train.sh made it
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if ! $B --help >/dev/null 2>&1; then ldd $B | grep -i 'not found'; $B --help 2>&1 | head -5; exit 1; fi
G="--config configs/shapes/decoder-finetune.toml --set run.device=cuda --set run.threads=2 --set data.workers=6 \
 --set data.items=5000000 --set decoder.train.validate_every=0"
N1=${N1:-r32}; X1=${X1:-"--set decoder.train.batch_size=256 --set run.seed=7"}
N2=${N2:-r64}; X2=${X2:-"--set decoder.resolution=64 --set decoder.train.batch_size=64 --set decoder.train.lr=3e-4 \
 --set run.seed=8 --set export.drop_first_upsampler=true"}
rm -rf /tmp/s1 /tmp/s2  # a second call on a warm machine must not resume the first smoke run
t0=$(date +%s)
$B $G $X1 --set run.out=/tmp/s1 --set decoder.train.steps=100000 --stop-after 40 > /tmp/s1.log 2>&1 &
$B $G $X2 --set run.out=/tmp/s2 --set decoder.train.steps=100000 --stop-after 40 > /tmp/s2.log 2>&1 &
wait
echo "smoke: $(( $(date +%s) - t0 )) s"; tail -n 15 /tmp/s1.log /tmp/s2.log
rate() { python3 - "$1" <<'PY'
import csv,sys
r={int(x['step']):float(x['secs']) for x in csv.DictReader(open(sys.argv[1]))}
print((r[40]-r[20])/20)
PY
}
p1=$(rate /tmp/s1/decoder/loss.csv) || exit 1
p2=$(rate /tmp/s2/decoder/loss.csv) || exit 1
left=$(( T - ($(date +%s) - t0) ))
n1=$(python3 -c "print(int(0.85*$left/$p1))"); n2=$(python3 -c "print(int(0.85*$left/$p2))")
echo "secs/step: $N1 $p1, $N2 $p2; left $left s; steps $n1 and $n2"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
t1=$(date +%s)
timeout $((left + 60)) $B $G $X1 --set run.out=/tmp/$N1 --set decoder.train.steps=$n1 > /tmp/$N1.log 2>&1 &
timeout $((left + 60)) $B $G $X2 --set run.out=/tmp/$N2 --set decoder.train.steps=$n2 > /tmp/$N2.log 2>&1 &
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; top -bn1 | head -12
wait
echo "main: $(( $(date +%s) - t1 )) s"; tail -n 4 /tmp/$N1.log /tmp/$N2.log
for r in $N1 $N2; do
  d=/tmp/$r/decoder
  f="$d/model/decoder/diffusion_pytorch_model.safetensors $d/model/text_proj/diffusion_pytorch_model.safetensors"
  if [ ! -f $d/complete.json ]; then
    last=$(ls -d $d/step-* | tail -1); echo "$r incomplete; keeping $last/ema.safetensors"
    cp $last/ema.safetensors $d/ema16.safetensors; f=$d/ema16.safetensors
  fi
  python3 - $f <<'PY'
import sys
from safetensors.torch import load_file, save_file
for p in sys.argv[1:]:
    t = load_file(p)
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}, p)
PY
  cp /tmp/$r.log /tmp/$r/
  tar -C /tmp/$r --exclude='./decoder/step-*' --exclude=weights.safetensors -cf $OUT/$r.tar .
done
tar -C /tmp -cf $OUT/smoke.tar s1.log s2.log s1/decoder/loss.csv s2/decoder/loss.csv
ls -la $OUT
