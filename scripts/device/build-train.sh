#!/usr/bin/env bash
# Builds `train` for a lent GPU machine whose Python torch differs from the 2.13.0 tch 0.26 is made
# for (the device image has torch 2.11.0+cu130 and no Rust toolchain), and puts it in gpu/train
# (ignored; name `gpu` in the device call's `carry`). scripts/device/decoder-gpu.sh runs it there.
#
# The binary links the wheel's own libtorch: the script fetches that wheel (no dependencies), builds
# against its headers and libraries, and stubs the few generated tch wrappers whose ops that torch
# lacks (they throw if called; nothing of ours calls them) in a private copy of torch-sys. The
# workspace's Cargo.lock is restored afterwards. Needs about 4 GB of disk and 5 minutes.
#
#   scripts/device/build-train.sh      # torch 2.11.0; TORCH_VERSION=..., DIR=... (default /tmp/unclip-torch-V)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
V=${TORCH_VERSION:-2.11.0}
DIR=${DIR:-/tmp/unclip-torch-$V}
mkdir -p "$DIR"
cd "$DIR"
if [[ ! -d torch/lib ]]; then
  "$repo/.venv/bin/pip" download --no-deps --no-cache-dir --only-binary=:all: "torch==$V" -d .
  unzip -q -o torch-"$V"-*.whl 'torch/lib/*' 'torch/include/*' 'torch/version.py' -d .
fi
src=$(ls -d "$HOME"/.cargo/registry/src/*/torch-sys-0.26.0 | head -1)
rm -rf torch-sys && cp -r "$src" torch-sys

cd "$repo"
cp Cargo.lock "$DIR/Cargo.lock.keep"
trap 'cp "$DIR/Cargo.lock.keep" "$repo/Cargo.lock"' EXIT
for attempt in 1 2 3 4; do
  if LIBTORCH="$DIR/torch" LIBTORCH_BYPASS_VERSION_CHECK=1 UNCLIP_DIST_NCCL=0 CARGO_TARGET_DIR="$DIR/target" \
    cargo build --release --config "patch.crates-io.torch-sys.path=\"$DIR/torch-sys\"" \
    -p unclip-examples --bin train >"$DIR/build.log" 2>&1; then
    break
  fi
  lines=$(grep -o 'torch_api_generated.cpp:[0-9]*:[0-9]*: error' "$DIR/build.log" | cut -d: -f2 | sort -un || true)
  if [[ -z "$lines" || $attempt == 4 ]]; then
    tail -30 "$DIR/build.log"
    exit 1
  fi
  echo "build-train: stubbing $(echo "$lines" | wc -l) generated wrappers this torch lacks"
  python3 - "$DIR/torch-sys/libtch/torch_api_generated.cpp" $lines <<'PY'
import sys
path, lines = sys.argv[1], sorted({int(x) for x in sys.argv[2:]}, reverse=True)
src = open(path).read().split("\n")
for line in lines:
    start = line - 1
    while not src[start].strip().startswith("PROTECT("):
        start -= 1
    end = line - 1
    while src[end] != "  )":
        end += 1
    src[start + 1:end] = ['    throw std::runtime_error("this op is not in the libtorch built against");']
open(path, "w").write("\n".join(src))
PY
done
mkdir -p gpu
cp "$DIR/target/release/train" gpu/train
strip gpu/train
grep -qx '/gpu/' .git/info/exclude || echo '/gpu/' >>.git/info/exclude
echo "build-train: gpu/train ($(du -h gpu/train | cut -f1)) against torch $V in $DIR/torch"
