#!/usr/bin/env bash
# Where the CPU of an uncached request goes: the proxies' task clock per request (perf stat) on
# the legacy Flask app's Monitoring page, under the same load as bench/run.sh's pass-through
# rows (oha -c 16 at half of nginx's saturated rate), the targets in turn, several rounds.
#
# Targets: nginx (2 workers, pinned), lotecache as bench/run.sh runs it (2 workers, pinned),
# lotecache with one worker (pinned), and examples/hyper_floor (hyper's server and client on
# one thread, nothing else). The difference between the lotecache rows is what the second
# worker thread costs; the one between one-worker lotecache and hyper_floor, what lotecache's
# own per-request work does beyond hyper's.
#
# Usage: bash bench/passthrough-cpu.sh [ROUNDS]   (default 5; ~2 min after the build, loopback only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
SECS=5

source bench/lib.sh
bench_tools
command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf
cargo build --release --quiet --bin lotecache --example hyper_floor

FLASK=$(free_port); NGINX=$(free_port); LC=$(free_port); LC1=$(free_port); FLOOR=$(free_port)
start_flask $FLASK
{ nginx_conf_head; nginx_pass_block flask $FLASK $NGINX; echo "}"; } > "$W/nginx.conf"
nginx -c "$W/nginx.conf" & PIDS+=($!); NGINX_PID=$!
lotecache_config $LC $(free_port) $FLASK "$W/lc-cache" "pin_workers = true" > "$W/lc.toml"
lotecache_config $LC1 $(free_port) $FLASK "$W/lc1-cache" "pin_workers = true
workers = 1" > "$W/lc1.toml"
"$BIN" serve --config "$W/lc.toml" 2>"$W/lc.log" & PIDS+=($!); LC_PID=$!
"$BIN" serve --config "$W/lc1.toml" 2>"$W/lc1.log" & PIDS+=($!); LC1_PID=$!
target/release/examples/hyper_floor --listen 127.0.0.1:$FLOOR --origin 127.0.0.1:$FLASK & PIDS+=($!); FLOOR_PID=$!
for p in $FLASK $NGINX $LC $LC1 $FLOOR; do wait_port $p; done
NGINX_PIDS=$(echo $NGINX_PID $(pgrep -P $NGINX_PID) | tr ' ' ,)

RATE=$(oha -c 16 -z ${SECS}s --no-tui --output-format json "http://127.0.0.1:$NGINX/monitoreo" 2>/dev/null | jq '.summary.requestsPerSec / 2 | floor')
N=$((RATE * SECS))
: > "$W/rows"
for round in $(seq "$ROUNDS"); do
  for t in "nginx=$NGINX=$NGINX_PIDS" "lotecache=$LC=$LC_PID" "lotecache, 1 worker=$LC1=$LC1_PID" "hyper_floor=$FLOOR=$FLOOR_PID"; do
    IFS== read -r label port pids <<< "$t"
    perf stat -e task-clock -p "$pids" -o "$W/perf.txt" -- \
      oha -c 16 -n $N -q $RATE --no-tui --output-format json "http://127.0.0.1:$port/monitoreo" > "$W/oha.json" 2>/dev/null
    ok=$(jq '.statusCodeDistribution["200"] // 0' "$W/oha.json")
    p50=$(jq '.latencyPercentiles.p50 * 1e6 | floor' "$W/oha.json")
    awk -v l="$label" -v ok="$ok" -v p50="$p50" '$2 == "msec" { gsub(",", "", $1); printf "%s\t%.1f\t%s\n", l, $1 * 1000 / ok, p50 }' "$W/perf.txt" >> "$W/rows"
  done
done

echo "## Proxy CPU per uncached request: GET /monitoreo, oha -c 16 -q $RATE, ${SECS}s per run, targets in turn, $ROUNDS rounds"
echo
echo "| target | task clock µs/req, each round | median | p50 µs, median |"
echo "|---|---|---|---|"
python3 - "$W/rows" <<'PY'
import collections, statistics, sys
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    label, cpu, p50 = line.rstrip("\n").split("\t")
    rows.setdefault(label, []).append((float(cpu), int(p50)))
for label, runs in rows.items():
    cpus = " ".join(f"{c:.0f}" for c, _ in runs)
    print(f"| {label} | {cpus} | **{statistics.median(c for c, _ in runs):.0f}** | {statistics.median(p for _, p in runs):.0f} |")
PY
echo
echo "machine: $(nproc) cores, $(uname -r); oha $(oha --version | awk '{print $2}'), $(nginx -v 2>&1 | cut -d/ -f2)"
