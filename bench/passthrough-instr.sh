#!/usr/bin/env bash
# Instructions per uncached request (callgrind, user space), lotecache against hyper_floor, on
# the legacy Flask app's Monitoring page. Unlike task-clock rounds under load (which spread by
# ±10 %), instruction counts repeat to within a fraction of a percent, so a change to the
# pass-through path can be judged by them.
#
# Each target runs under callgrind with one worker; after a warm-up the counters are zeroed,
# REQUESTS requests go one at a time (oha -c 1), and the counters are dumped. Prints each
# target's instructions per request and its 25 costliest functions (own instructions, callees
# excluded); the dumps stay in target/callgrind/ for callgrind_annotate.
#
# Usage: bash bench/passthrough-instr.sh [REQUESTS]   (default 1000; ~1 min after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-1000}

source bench/lib.sh
bench_tools
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind
cargo build --release --quiet --bin lotecache --example hyper_floor

FLASK=$(free_port); LC=$(free_port); FLOOR=$(free_port)
start_flask $FLASK
lotecache_config $LC $(free_port) $FLASK "$W/lc-cache" "workers = 1" > "$W/lc.toml"
valgrind --tool=callgrind --callgrind-out-file="$W/lc.out" "$BIN" serve --config "$W/lc.toml" 2>"$W/lc.log" & PIDS+=($!); LC_PID=$!
valgrind --tool=callgrind --callgrind-out-file="$W/floor.out" target/release/examples/hyper_floor \
  --listen 127.0.0.1:$FLOOR --origin 127.0.0.1:$FLASK 2>"$W/floor.log" & PIDS+=($!); FLOOR_PID=$!
for p in $FLASK $LC $FLOOR; do wait_port $p; done

echo "## Instructions per uncached request: GET /monitoreo, one at a time, $REQUESTS requests after a warm-up"
echo
for t in "lotecache=$LC=$LC_PID=lc" "hyper_floor=$FLOOR=$FLOOR_PID=floor"; do
  IFS== read -r label port pid name <<< "$t"
  oha -c 1 -n 200 --no-tui "http://127.0.0.1:$port/monitoreo" >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null
  oha -c 1 -n "$REQUESTS" --no-tui --output-format json "http://127.0.0.1:$port/monitoreo" > "$W/oha.json" 2>/dev/null
  callgrind_control -d "$pid" >/dev/null
  ok=$(jq '.statusCodeDistribution["200"] // 0' "$W/oha.json")
  dump=$(ls -t "$W/$name.out".* | head -1)
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
  echo "- **$label**: $((total / ok)) instructions per request ($ok answered 200)"
  echo "$label" > "$W/$name.label"
  mkdir -p target/callgrind && cp "$dump" "target/callgrind/$name.out"
  callgrind_annotate "$dump" 2>/dev/null | awk -v ok="$ok" '
    /file:function/ { on = 1; next }
    on && NF >= 2 && n < 25 { c = $1; gsub(",", "", c); sub(/^ *[0-9,]+ *\( *[0-9.]+%\) */, ""); printf "%8.0f  %s\n", c / ok, $0; n++ }' > "$W/$name.top"
done
echo
for name in lc floor; do
  echo "### $(cat "$W/$name.label"): costliest functions, own instructions per request"
  echo; echo '```'; cat "$W/$name.top"; echo '```'; echo
done
echo "machine: $(nproc) cores, $(uname -r); $(valgrind --version)"
