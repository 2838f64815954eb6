#!/usr/bin/env bash
# Builds the app of the README's "Use it in your app" section in a folder outside the workspace,
# from the README's own Cargo.toml, build.rs and main.rs blocks (only `../unclip-rs` replaced by
# this checkout's path), and checks what the section promises:
#   - readelf -d: NEEDED libtorch_cuda.so (when the libtorch has one) and a RUNPATH to libtorch;
#   - it runs without LD_LIBRARY_PATH and writes a PNG with models/shapes.
# The app builds into this workspace's target folder with its profile, so only the app itself
# compiles (seconds, not the minutes of tch's C++).
set -euo pipefail
# The physical path, as cargo sees it: LIBTORCH below must be the very string the workspace build
# used, or torch-sys rebuilds its C++.
repo=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$repo"
# The README's build instruction: LIBTORCH as for this workspace (an environment value wins).
export LIBTORCH=${LIBTORCH:-$repo/.venv/libtorch}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
unset LD_LIBRARY_PATH

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
app=$work/unclip-app-check

# The n-th fenced block of the given language in the README section "## Use it in your app".
block() {
  awk -v lang="$1" -v want="$2" '
    /^## Use it in your app/ { on = 1; next }
    on && /^## / { on = 0 }
    on && $0 == "```" lang { n++; if (n == want) { grab = 1; next } }
    grab && /^```/ { grab = 0 }
    grab { print }
  ' README.md | sed "s#\.\./unclip-rs#$repo#g"
}

cargo new --quiet --vcs none --bin "$app"
# A new project's empty [dependencies] header is replaced by the README's lines.
sed -i '/^\[dependencies\]$/d' "$app/Cargo.toml"
block toml 1 >> "$app/Cargo.toml"
block rust 1 > "$app/build.rs"
block rust 2 > "$app/src/main.rs"
for f in Cargo.toml build.rs src/main.rs; do
  [[ -s "$app/$f" ]] || { echo "check-dependent-app: README block for $f not found" >&2; exit 1; }
done
# Same resolved versions and profile as the workspace: the target folder's artifacts are reused.
cp Cargo.lock "$app/"
profile=(
  --config 'profile.dev.opt-level=1' --config 'profile.dev.debug="line-tables-only"'
  --config 'profile.dev.package."*".opt-level=3' --config 'profile.dev.package."*".debug=false'
)
for c in unclip unclip-core unclip-scheduler unclip-clip unclip-prior unclip-decoder; do
  profile+=(--config "profile.dev.package.$c.opt-level=1"
            --config "profile.dev.package.$c.debug=\"line-tables-only\"")
done

start=$SECONDS
(cd "$app" && cargo build --offline "${profile[@]}")
echo "check-dependent-app: built in $((SECONDS - start)) s"
bin=$CARGO_TARGET_DIR/debug/unclip-app-check
dynamic=$(readelf -d "$bin")

passed=0 failed=0
check() {
  if eval "$2"; then passed=$((passed + 1)); echo "ok: $1"; else failed=$((failed + 1)); echo "FAILED: $1"; fi
}
lib=$(cd "$LIBTORCH/lib" && pwd -P)
check "RUNPATH names the libtorch lib folder $lib" 'grep -E "R(UN)?PATH" <<<"$dynamic" | grep -qF "$lib"'
if [[ -e "$lib/libtorch_cuda.so" ]]; then
  check "NEEDED libtorch_cuda.so" 'grep NEEDED <<<"$dynamic" | grep -q "libtorch_cuda.so"'
else
  echo "note: $lib has no libtorch_cuda.so (CPU-only libtorch): nothing to keep"
fi
start=$SECONDS
check "the app runs and writes out/image-0.png" '(cd "$app" && "$bin") && [[ -s "$app/out/image-0.png" ]]'
echo "check-dependent-app: ran in $((SECONDS - start)) s"
check "the image is a PNG" '[[ "$(head -c 8 "$app/out/image-0.png" | od -An -tx1 | tr -d " \n")" == 89504e470d0a1a0a ]]'
rm -f "$bin"
echo "dependent-app: $passed passed, $failed failed"
[[ $failed == 0 ]]
