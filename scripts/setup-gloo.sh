#!/usr/bin/env bash
# Provides gloo's headers, which unclip-dist's Gloo (CPU) backend compiles against and PyTorch's
# wheels do not ship: Debian's libgloo-dev, installed only when missing. Without them everything
# still builds; only unclip-dist's Gloo groups (and their tests) are unavailable.
set -euo pipefail
if [[ -f /usr/include/gloo/algorithm.h || -n "${UNCLIP_DIST_GLOO_INCLUDE:-}" ]]; then
  exit 0
fi
install=(apt-get install -y -qq --no-install-recommends libgloo-dev)
if command -v apt-get >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup-gloo: installing libgloo-dev (gloo's headers, for unclip-dist)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${install[@]}"
    exit 0
  elif sudo -n true 2>/dev/null; then
    echo "setup-gloo: installing libgloo-dev (gloo's headers, for unclip-dist)"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive "${install[@]}"
    exit 0
  fi
fi
echo "setup-gloo: warning: gloo's headers are missing and cannot be installed here; unclip-dist builds" \
  "without its Gloo backend (install Debian's libgloo-dev, or set UNCLIP_DIST_GLOO_INCLUDE)" >&2
