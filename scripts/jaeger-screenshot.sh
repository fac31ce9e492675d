#!/usr/bin/env bash
# Redo docs/jaeger-trace.png, the README's picture of a trace in the Jaeger UI:
#   scripts/jaeger-screenshot.sh [--out PATH]      (as root)
# Installs what the picture needs, then runs scripts/jaeger-screenshot.py:
# - Jaeger v2 and the .venv: scripts/bootstrap.sh --test-peers (cached after the first run);
# - headless Chromium: Debian's `chromium` package;
# - the Jaeger UI's assets, which the Go module Jaeger is built from does not carry:
#   built once with npm from a jaeger-ui source checkout of the matching tag, given as
#   JAEGER_UI_SRC (git clone --branch v1.75.0 https://github.com/jaegertracing/jaeger-ui),
#   and kept in the cache. A directory of already built assets can be given as
#   JAEGER_UI_ASSETS instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${OTEL_EBPF_CACHE:-/var/cache/otel-ebpf}"
UI_VERSION=v1.75.0  # the UI released with Jaeger v1.75.0 / 2.12.0
ASSETS="${JAEGER_UI_ASSETS:-$CACHE/jaeger-ui-$UI_VERSION}"

log() { printf 'jaeger-screenshot: %s\n' "$*" >&2; }

"$ROOT/scripts/bootstrap.sh" --test-peers

if ! command -v chromium >/dev/null; then
  log "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if [ ! -f "$ASSETS/index.html" ]; then
  src="${JAEGER_UI_SRC:-}"
  if [ -z "$src" ] || [ ! -f "$src/packages/jaeger-ui/package.json" ]; then
    log "no Jaeger UI assets at $ASSETS; set JAEGER_UI_SRC to a jaeger-ui checkout of tag $UI_VERSION"
    log "  (git clone --branch $UI_VERSION https://github.com/jaegertracing/jaeger-ui) or JAEGER_UI_ASSETS to built assets"
    exit 2
  fi
  log "building the Jaeger UI from $src (a few minutes)"
  # Its package.json asks for Node 24 (engine-strict); its Vite 7 build runs on Node 20.19+.
  (cd "$src" && npm ci --no-audit --no-fund --engine-strict=false --ignore-scripts \
    && npm run build)
  mkdir -p "$ASSETS"
  cp -a "$src/packages/jaeger-ui/build/." "$ASSETS/"
fi

exec "${OTEL_EBPF_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/jaeger-screenshot.py" \
  --ui-assets "$ASSETS" "$@"
