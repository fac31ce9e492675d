#!/bin/sh
# Container entry point: give BCC kernel headers, then exec otel-ebpf.
#
# BCC compiles the BPF programs at start-up and looks for headers at
# /lib/modules/$(uname -r)/build (and .../source). The host's headers are mounted at
# $HOST_ROOT/lib/modules and $HOST_ROOT/usr/src; their symlinks are absolute host paths,
# so they are re-pointed here under $HOST_ROOT. /lib/modules in the container is an
# empty writable volume for these links. When the host has no headers for its kernel,
# the Debian 6.1 headers baked into the image are used: tracepoint and uprobe programs
# take their argument layouts from tracefs, not from headers.
set -eu

HOST_ROOT="${OTEL_EBPF_HOST_ROOT:-/host}"
MODULES_DIR="${OTEL_EBPF_MODULES_DIR:-/lib/modules}"
IMAGE_HEADERS="${OTEL_EBPF_IMAGE_HEADERS:-/usr/src}"
KREL="${OTEL_EBPF_KERNEL_RELEASE:-$(uname -r)}"

log() { printf 'otel-ebpf-entrypoint: %s\n' "$*" >&2; }

# Where a host path (a symlink or a directory under $HOST_ROOT) really is, seen from here.
host_target() {
  p="$1"
  n=0
  while [ -L "$p" ] && [ "$n" -lt 10 ]; do
    t="$(readlink "$p")"
    case "$t" in
      /*) p="$HOST_ROOT$t" ;;
      *) p="$(dirname "$p")/$t" ;;
    esac
    n=$((n + 1))
  done
  [ -d "$p" ] && printf '%s\n' "$p"
}

dest="$MODULES_DIR/$KREL"
if [ -e "$dest/build/include" ]; then
  : # already usable (headers baked for this exact kernel, or a previous start)
elif build="$(host_target "$HOST_ROOT/lib/modules/$KREL/build")" && [ -d "$build/include" ]; then
  mkdir -p "$dest"
  ln -sfn "$build" "$dest/build"
  if source_dir="$(host_target "$HOST_ROOT/lib/modules/$KREL/source")"; then
    ln -sfn "$source_dir" "$dest/source"
  fi
  log "using the host's kernel headers for $KREL ($build)"
else
  build="$(ls -d "$IMAGE_HEADERS"/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
  common="$(ls -d "$IMAGE_HEADERS"/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$build" ]; then
    mkdir -p "$dest"
    ln -sfn "$build" "$dest/build"
    [ -n "$common" ] && ln -sfn "$common" "$dest/source"
    log "no host headers for $KREL under $HOST_ROOT; using the image's $(basename "$build")"
  else
    log "no kernel headers for $KREL (host or image): BPF compilation will fail; mount the host's /lib/modules and /usr/src under $HOST_ROOT"
  fi
fi

exec "$@"
