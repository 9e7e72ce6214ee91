#!/usr/bin/env bash
# Cold-miss benchmark: 100 simultaneous requests for a never-seen batch against a sample
# origin that takes 500 ms to generate it. Prints origin generations and latency (ms).
# Loopback only; bounded (a few seconds). Usage: bench/coldmiss.sh [N] [DELAY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
DELAY=${2:-500ms}

cargo build --release --quiet --bin lotecache --example coldmiss
source bench/lib.sh

ORIGIN_PORT=$(free_port); PROXY_PORT=$(free_port)
"$BIN" sample-origin --listen 127.0.0.1:$ORIGIN_PORT --delay "$DELAY" 2>"$W/origin.log" & PIDS+=($!)
"$BIN" serve --listen 127.0.0.1:$PROXY_PORT --origin http://127.0.0.1:$ORIGIN_PORT --cache-dir "$W/cache" 2>"$W/proxy.log" & PIDS+=($!)
wait_port "$ORIGIN_PORT"; wait_port "$PROXY_PORT"

echo "cold miss: $N simultaneous requests, origin generation time $DELAY"
echo
echo "| cache | requests | origin generations | failed | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|---|"
target/release/examples/coldmiss -n "$N" --proxy http://127.0.0.1:$PROXY_PORT --origin http://127.0.0.1:$ORIGIN_PORT --id "COLD-$RANDOM-$$" --label lotecache
