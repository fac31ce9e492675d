#!/usr/bin/env bash
# Idempotent set-up of everything otel-ebpf needs on a Debian 12 host, run as root:
# system packages (BCC, headers, test peers), the kernel-headers link BCC insists on,
# tracefs, and a virtualenv (.venv) that sees Debian's BCC module.
# Each step is skipped when already done, so calling it before every run costs ~1 s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OTEL_EBPF_VENV:-$ROOT/.venv}"
WITH_TEST_PEERS="${1:-}"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (loading eBPF needs CAP_BPF/CAP_SYS_ADMIN); try: sudo $0 $*"
  exit 1
fi

# 1. System packages. BCC comes from Debian (python3-bpfcc); the 6.1 headers serve
#    tracepoint/uprobe programs on other kernels (their argument layouts come from
#    tracefs, not from headers).
need=(bpfcc-tools python3-bpfcc linux-headers-amd64 python3-venv libssl3 openssl curl)
if [ "$WITH_TEST_PEERS" = "--test-peers" ]; then
  need+=(nginx-light wrk nodejs golang-go apache2-utils iproute2)
  # HTTP/2 peers: nghttp and h2load (client), nghttpd (server). Debian's nginx-light
  # has the http_v2 module; curl speaks HTTP/2 through libnghttp2; Node has http2.
  need+=(nghttp2-client nghttp2-server)
  # tests/integration/test_prometheus.py scrapes the daemon with a real Prometheus server.
  need+=(prometheus)
  # tests/integration/test_top.py drives the live `otel-ebpf top` table in tmux.
  need+=(tmux)
fi
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# nodejs may come from another repository (NodeSource); any installed `node` will do.
if command -v node >/dev/null; then
  missing=("${missing[@]/nodejs}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Headers: BCC looks in /lib/modules/$(uname -r)/build. Link the newest installed
#    Debian headers tree when the running kernel ships none.
KREL="$(uname -r)"
if [ ! -e "/lib/modules/$KREL/build" ]; then
  hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$hdr" ]; then
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    ln -sfn "$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)" "/lib/modules/$KREL/source" 2>/dev/null || true
    log "linked /lib/modules/$KREL/build -> $hdr"
  else
    log "no kernel headers found under /usr/src; BCC compilation will fail"
  fi
fi

# 3. tracefs: may be unmounted on a fresh boot.
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "could not mount tracefs at /sys/kernel/tracing"
fi

# 4. Virtualenv from Debian's python3, so `import bcc` works.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.otel-ebpf-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing otel-ebpf and its Python dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  touch "$stamp"
fi

# 5. Test peer: Jaeger v2 (tests/integration/test_jaeger.py), built from the Go module
#    proxy once and cached (7.5 min here on 2 busy cores, downloads included; it needs
#    Go >= 1.24, /usr/local/go). `go install pkg@version` refuses it
#    (its go.mod has a replace directive), so it is built inside its downloaded module,
#    where go.mod and go.sum apply as the authors pinned them. No UI assets: those are
#    not in the Go module (scripts/jaeger-screenshot.py says how to add them).
if [ "$WITH_TEST_PEERS" = "--test-peers" ]; then
  JAEGER_VERSION=v1.75.0
  JAEGER_BIN="${OTEL_EBPF_JAEGER_BIN:-${OTEL_EBPF_CACHE:-/var/cache/otel-ebpf}/jaeger-$JAEGER_VERSION/jaeger}"
  if [ ! -x "$JAEGER_BIN" ]; then
    GO="$(command -v /usr/local/go/bin/go go | head -n 1)"
    log "building Jaeger $JAEGER_VERSION into $JAEGER_BIN with $($GO version) (minutes)"
    started=$(date +%s)
    moddir="$("$GO" mod download -json "github.com/jaegertracing/jaeger@$JAEGER_VERSION" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' || true)"
    mkdir -p "$(dirname "$JAEGER_BIN")"
    # A failed build does not stop the other tests: test_jaeger.py then fails under
    # CI=true (skips elsewhere) naming the missing binary.
    if [ -n "$moddir" ] && (cd "$moddir" && "$GO" build -trimpath -o "$JAEGER_BIN.tmp" ./cmd/jaeger); then
      mv "$JAEGER_BIN.tmp" "$JAEGER_BIN"
      log "built Jaeger in $(( $(date +%s) - started )) s"
    else
      log "could not build Jaeger $JAEGER_VERSION (see above); tests/integration/test_jaeger.py will fail under CI=true"
    fi
  fi
fi

# 6. Test peer: a grpc-go Greeter server and client (tests/peers/go-grpc, for
#    tests/integration/test_http2_capture.py), built from the Go module proxy once per
#    source version (go.sum pins every module) into the cache (~40 s on 2 cores).
if [ "$WITH_TEST_PEERS" = "--test-peers" ]; then
  GREETER_SRC="$ROOT/tests/peers/go-grpc"
  GREETER_REV="$(cat "$GREETER_SRC/go.mod" "$GREETER_SRC/go.sum" "$GREETER_SRC/main.go" | sha256sum | cut -c1-12)"
  GREETER_BIN="${OTEL_EBPF_CACHE:-/var/cache/otel-ebpf}/go-grpc-greeter-$GREETER_REV/greeter"
  if [ ! -x "$GREETER_BIN" ]; then
    GO="$(command -v /usr/local/go/bin/go go | head -n 1)"
    log "building the grpc-go test peer into $GREETER_BIN with $($GO version)"
    mkdir -p "$(dirname "$GREETER_BIN")"
    (cd "$GREETER_SRC" && GOFLAGS=-mod=readonly "$GO" build -trimpath -o "$GREETER_BIN.tmp" .)
    mv "$GREETER_BIN.tmp" "$GREETER_BIN"
  fi
fi
