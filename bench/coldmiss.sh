#!/usr/bin/env bash
# Cold-miss benchmark: 100 simultaneous requests for a never-seen batch against a sample
# origin that takes 500 ms to generate it. Prints origin generations and latency (ms).
# Loopback only; bounded (a few seconds). Usage: bench/coldmiss.sh [N] [DELAY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
DELAY=${2:-500ms}

cargo build --release --quiet --bin lotecache --example coldmiss
BIN=target/release/lotecache
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

ORIGIN_PORT=$(free_port); PROXY_PORT=$(free_port)
"$BIN" sample-origin --listen 127.0.0.1:$ORIGIN_PORT --delay "$DELAY" 2>"$WORK/origin.log" & PIDS+=($!)
"$BIN" serve --listen 127.0.0.1:$PROXY_PORT --origin http://127.0.0.1:$ORIGIN_PORT --cache-dir "$WORK/cache" 2>"$WORK/proxy.log" & PIDS+=($!)
wait_port "$ORIGIN_PORT"; wait_port "$PROXY_PORT"

echo "cold miss: $N simultaneous requests, origin generation time $DELAY"
echo
echo "| cache | requests | origin generations | failed | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|---|"
target/release/examples/coldmiss -n "$N" --proxy http://127.0.0.1:$PROXY_PORT --origin http://127.0.0.1:$ORIGIN_PORT --id "COLD-$RANDOM-$$" --label lotecache
