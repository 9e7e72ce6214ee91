#!/usr/bin/env bash
# lotecache vs nginx proxy_cache, side by side in one run on this machine (loopback only).
#
# Installs what it lacks (oha with cargo, nginx from the distribution), builds lotecache in
# release mode, starts the sample origin (lotecache sample-origin), nginx with an equivalent
# proxy_cache configuration and lotecache in front of it, warms both, then for 4 KB, 256 KB
# and 16 MB bodies runs oha (-c 64, keep-alive) against each in alternation (A B A B A B) and
# prints one markdown table: req/s, p50, p99, MB/s, server CPU µs per request, peak RSS, and
# lotecache / nginx ratios. Then the cold miss (100 simultaneous requests, 500 ms origin)
# against both, and the pass-through overhead (lotecache and nginx vs the origin directly), on
# the sample origin and on the legacy Flask app's Monitoring page (gunicorn, 2 workers): under
# oha at a fixed rate, and one request at a time with the three targets interleaved request by
# request (examples/hop_latency), which cancels the machine's drift.
#
# lotecache runs with its workers pinned to the cores (server.pin_workers), as nginx's are; a
# second instance with the default, unpinned, is measured beside it where the two can differ:
# the hits' latency at equal load (the same offered rate to each, see below) and the Flask page
# under load.
#
# oha runs with --disable-compression (it asks for br and gzip otherwise): every row here is
# of uncompressed bodies; bench/compression.sh measures the compressed ones.
#
# Usage: bash bench/run.sh [SECONDS_PER_RUN]     (default 10; the whole run stays under 15 min)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CONC=64

source bench/lib.sh
bench_tools
cargo build --release --quiet --bin lotecache --example coldmiss --example hop_latency

ORIGIN=$(free_port); NGINX=$(free_port); LC=$(free_port); ADMIN=$(free_port); LC_UNPIN=$(free_port)
FLASK=$(free_port); NGINX_FLASK=$(free_port); LC_FLASK=$(free_port); ADMIN_FLASK=$(free_port); LC_FLASK_UNPIN=$(free_port)
"$BIN" sample-origin --listen 127.0.0.1:$ORIGIN --delay 500ms 2>"$W/origin.log" & PIDS+=($!)
start_flask $FLASK

mkdir -p "$W/nginx-cache"
{ nginx_conf_head; cat <<NGINX
  proxy_cache_path $W/nginx-cache levels=1:2 keys_zone=lotes:10m max_size=10g inactive=1d use_temp_path=off;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 32; }
  server {
    listen 127.0.0.1:$NGINX;
    location /download_batch_results/ {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache lotes;
      proxy_cache_key \$uri;
      proxy_cache_valid 200 1d;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 60s;
      add_header Cache-Status \$upstream_cache_status;
    }
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
NGINX
nginx_pass_block flask $FLASK $NGINX_FLASK
echo "}"
} > "$W/nginx.conf"
nginx -c "$W/nginx.conf" & PIDS+=($!); NGINX_PID=$!

lotecache_config $LC $ADMIN $ORIGIN "$W/lc-cache" "pin_workers = true" > "$W/lc.toml"
lotecache_config $LC_FLASK $ADMIN_FLASK $FLASK "$W/lc-flask-cache" "pin_workers = true" > "$W/lc-flask.toml"
# The same with the default, unpinned workers, measured beside it where the two can differ: the
# hits' latency at equal load, and the Flask page under load.
lotecache_config $LC_UNPIN $(free_port) $ORIGIN "$W/lc-unpin-cache" > "$W/lc-unpin.toml"
lotecache_config $LC_FLASK_UNPIN $(free_port) $FLASK "$W/lc-flask-unpin-cache" > "$W/lc-flask-unpin.toml"
"$BIN" serve --config "$W/lc.toml" 2>"$W/lc.log" & PIDS+=($!); LC_PID=$!
"$BIN" serve --config "$W/lc-flask.toml" 2>"$W/lc-flask.log" & PIDS+=($!); LC_FLASK_PID=$!
"$BIN" serve --config "$W/lc-unpin.toml" 2>"$W/lc-unpin.log" & PIDS+=($!)
"$BIN" serve --config "$W/lc-flask-unpin.toml" 2>"$W/lc-flask-unpin.log" & PIDS+=($!); LC_FLASK_UNPIN_PID=$!
for p in $ORIGIN $NGINX $LC $LC_UNPIN $FLASK $NGINX_FLASK $LC_FLASK $LC_FLASK_UNPIN; do wait_port $p; done

rss_peak_kib() { local total=0 v; for p in "$@"; do v=$(awk '/VmHWM/ {print $2}' /proc/$p/status 2>/dev/null || true); total=$((total + ${v:-0})); done; echo $total; }

declare -A SIZE_ID=([4KB]=bench-4kb [256KB]=bench-256kb [16MB]=bench-16mb)
for id in "${SIZE_ID[@]}"; do
  for port in $NGINX $LC $LC_UNPIN; do curl -s -o /dev/null "http://127.0.0.1:$port/download_batch_results/$id"; curl -s -o /dev/null "http://127.0.0.1:$port/download_batch_results/$id"; done
done

# run LABEL PORT PIDS... → appends "label size rps p50 p99 mbs cpu_us rss" to $W/rows
run() {
  local label=$1 size=$2 port=$3; shift 3
  local url="http://127.0.0.1:$port/download_batch_results/${SIZE_ID[$size]}"
  local t0; t0=$(ticks "$@")
  oha -c $CONC -z ${SECS}s --disable-compression --no-tui --output-format json "$url" > "$W/oha.json" 2>/dev/null
  local t1; t1=$(ticks "$@")
  local n; n=$(jq '.statusCodeDistribution["200"] // 0' "$W/oha.json")
  jq -r --arg l "$label" --arg s "$size" --argjson cpu "$(( (t1 - t0) ))" --argjson hz "$HZ" --argjson n "$n" --argjson rss "$(rss_peak_kib "$@")" \
    '[$l, $s, .summary.requestsPerSec, .latencyPercentiles.p50 * 1000, .latencyPercentiles.p99 * 1000, .summary.sizePerSec / 1e6, (if $n > 0 then $cpu / $hz * 1e6 / $n else 0 end), $rss / 1024] | @tsv' \
    "$W/oha.json" >> "$W/rows"
}

: > "$W/rows"
for size in 4KB 256KB 16MB; do
  for round in 1 2 3; do
    run lotecache $size $LC $LC_PID
    run nginx $size $NGINX $(nginx_pids)
  done
done

echo "## Cached hits: oha -c $CONC, ${SECS}s per run, A B A B A B (mean of 3 runs each)"
echo
echo "| size | server | req/s | p50 ms | p99 ms | MB/s | CPU µs/req | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
python3 - "$W/rows" <<'PY'
import sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    l, s, *vals = line.rstrip("\n").split("\t")
    rows[(s, l)].append([float(v) for v in vals])
def mean(s, l):
    runs = rows[(s, l)]
    m = [sum(c) / len(c) for c in zip(*runs)]
    m[-1] = max(r[-1] for r in runs)  # peak RSS: the highest seen
    return m
labels = ["lotecache"]
for s in ["4KB", "256KB", "16MB"]:
    b = mean(s, "nginx")
    for l in labels + ["nginx"]:
        v = mean(s, l)
        print(f"| {s} | {l} | {v[0]:.0f} | {v[1]:.2f} | {v[2]:.2f} | {v[3]:.0f} | {v[4]:.1f} | {v[5]:.1f} |")
    for l in labels:
        a = mean(s, l)
        print(f"| {s} | **{l} / nginx** | **{a[0]/b[0]:.2f}×** | {a[1]/b[1]:.2f}× | {a[2]/b[2]:.2f}× | {a[3]/b[3]:.2f}× | {a[4]/b[4]:.2f}× | {a[5]/b[5]:.2f}× |")
PY

# Latency at equal load: at saturation the load generator, sharing the 2 cores, is itself the
# bottleneck behind a faster server, and its own threads' time slicing (~4 ms) becomes the
# tail. So the same request rate — 80 % of nginx's saturated rate for that size — is also
# offered to each, and their latencies compared there.
echo
echo "## Latency at equal load: oha -c $CONC -q (80 % of nginx's req/s above), ${SECS}s per run, A B C A B C"
echo
echo "| size | server | offered req/s | p50 ms | p99 ms | p99.9 ms |"
echo "|---|---|---|---|---|---|"
: > "$W/rate-rows"
for size in 4KB 256KB; do
  rate=$(awk -F'\t' -v s=$size '$1 == "nginx" && $2 == s { t += $3; n++ } END { printf "%d", 0.8 * t / n }' "$W/rows")
  for round in 1 2; do
    for target in "lotecache=$LC" "lotecache, unpinned (default)=$LC_UNPIN" "nginx=$NGINX"; do
      url="http://127.0.0.1:${target#*=}/download_batch_results/${SIZE_ID[$size]}"
      oha -c $CONC -z ${SECS}s -q "$rate" --disable-compression --no-tui --output-format json "$url" > "$W/oha.json" 2>/dev/null
      jq -r --arg l "${target%%=*}" --arg s "$size" --arg q "$rate" \
        '[$s, $l, $q, .latencyPercentiles.p50 * 1000, .latencyPercentiles.p99 * 1000, .latencyPercentiles["p99.9"] * 1000] | @tsv' \
        "$W/oha.json" >> "$W/rate-rows"
    done
  done
done
python3 - "$W/rate-rows" <<'PY'
import sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    s, l, q, *vals = line.rstrip("\n").split("\t")
    rows[(s, l, q)].append([float(v) for v in vals])
for (s, l, q), runs in rows.items():
    m = [sum(c) / len(c) for c in zip(*runs)]
    print(f"| {s} | {l} | {q} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} |")
for s in ["4KB", "256KB"]:
    base = next(v for (s2, l, q), v in rows.items() if s2 == s and l == "nginx")
    b = [sum(c) / len(c) for c in zip(*base)]
    for (s2, l, q), runs in rows.items():
        if s2 == s and l != "nginx":
            a = [sum(c) / len(c) for c in zip(*runs)]
            print(f"| {s} | **{l} / nginx** | | {a[0]/b[0]:.2f}× | **{a[1]/b[1]:.2f}×** | {a[2]/b[2]:.2f}× |")
PY

echo
echo "## Cold miss: 100 simultaneous requests for a never-seen batch, origin generation 500 ms"
echo
echo "| cache | requests | origin generations | failed | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|---|"
target/release/examples/coldmiss -n 100 --proxy http://127.0.0.1:$LC --origin http://127.0.0.1:$ORIGIN --id "COLD-LC-$$" --label lotecache
target/release/examples/coldmiss -n 100 --proxy http://127.0.0.1:$NGINX --origin http://127.0.0.1:$ORIGIN --id "COLD-NGINX-$$" --label nginx

echo
# Pass-through: what one more hop costs a request that is not cached. The trivial route and the
# Flask page are CPU-bound, so a closed loop there measures how the 2 cores are shared, not the
# hop; each is offered half of what nginx in front of it carries saturated (found first), and the
# proxies' CPU per request is counted. The POST batch waits 500 ms on the origin: a closed loop.
# Six short rounds rather than three long ones, in the same time: the page's own time drifts by
# a fifth between runs seconds apart, and each round's ratio is taken to the origin beside it.
PASS_ROUNDS=6
PASS_SECS=$(( SECS > 1 ? SECS / 2 : 1 ))
echo "## Pass-through (not cached): lotecache and nginx vs the origin directly, oha -c 16, ${PASS_SECS}s per run, A B C in $PASS_ROUNDS rounds"
echo
echo "| route | target | offered req/s | req/s | p50 ms | p99 ms | proxy CPU µs/req |"
echo "|---|---|---|---|---|---|---|"
# pass LABEL ROUTE URL RATE PIDS... [-- OHA_ARGS...] → one table row; RATE 0: closed loop (then
# no CPU per request: at 31 requests/s the clock ticks are too coarse for it)
pass() {
  local label=$1 route=$2 url=$3 rate=$4; shift 4
  local pids=() ; while [ $# -gt 0 ] && [ "$1" != -- ]; do pids+=("$1"); shift; done; [ $# -gt 0 ] && shift
  local q=(); [ "$rate" -gt 0 ] && q=(-q "$rate")
  local t0; t0=$(ticks "${pids[@]}")
  oha -c 16 -z ${PASS_SECS}s "${q[@]}" --disable-compression --no-tui --output-format json "$@" "$url" > "$W/oha.json" 2>/dev/null
  local t1; t1=$(ticks "${pids[@]}")
  jq -r --arg l "$label" --arg r "$route" --arg q "${rate/#0/-}" --argjson cpu $((t1 - t0)) --argjson hz "$HZ" --argjson np ${#pids[@]} \
    '(.statusCodeDistribution["200"] // 0) as $n | "| \($r) | \($l) | \($q) | \(.summary.requestsPerSec | floor) | \(.latencyPercentiles.p50 * 1000 * 100 | round / 100) | \(.latencyPercentiles.p99 * 1000 * 100 | round / 100) | \(if $np == 0 or $n == 0 or $q == "-" then "–" else ($cpu / $hz * 1e6 / $n | floor) end) |"' "$W/oha.json" \
    | tee -a "$W/pass-rows"
}
half_saturated_rate() { oha -c 16 -z ${SECS}s --disable-compression --no-tui --output-format json "$1" 2>/dev/null | jq '.summary.requestsPerSec / 2 | floor'; }
NGINX_PIDS=$(nginx_pids)
# pass_route ROUTE PATH RATE TARGET... [-- OHA_ARGS...], each TARGET "label=port=pid,pid" (no
# pids: no CPU counted): the targets in turn, $PASS_ROUNDS rounds
pass_route() {
  local route=$1 path=$2 rate=$3; shift 3
  local targets=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do targets+=("$1"); shift; done; [ $# -gt 0 ] && shift
  for round in $(seq $PASS_ROUNDS); do
    for t in "${targets[@]}"; do
      IFS== read -r label port pids <<< "$t"
      pass "$label" "$route" "http://127.0.0.1:$port$path" "$rate" ${pids//,/ } -- "$@"
    done
  done
}
NGINX_CSV=${NGINX_PIDS// /,}
pass_route "GET /__stats (sample origin, ~60 µs)" /__stats "$(half_saturated_rate "http://127.0.0.1:$NGINX/__stats")" \
  "lotecache=$LC=$LC_PID" "nginx=$NGINX=$NGINX_CSV" "origin=$ORIGIN="
pass_route "GET /monitoreo (legacy Flask app)" /monitoreo "$(half_saturated_rate "http://127.0.0.1:$NGINX_FLASK/monitoreo")" \
  "lotecache=$LC_FLASK=$LC_FLASK_PID" "lotecache, unpinned (default)=$LC_FLASK_UNPIN=$LC_FLASK_UNPIN_PID" \
  "nginx=$NGINX_FLASK=$NGINX_CSV" "origin=$FLASK="
pass_route "POST batch (sample origin, 500 ms generation)" /download_batch_results/pass-4kb 0 \
  "lotecache=$LC=$LC_PID" "nginx=$NGINX=$NGINX_CSV" "origin=$ORIGIN=" -- -m POST
echo
echo "Pass-through overhead: median p50 of the $PASS_ROUNDS rounds, and the median of each round's own ratio"
echo "to the origin measured beside it (the origin's own time drifts between rounds)."
echo
echo "| route | target | p50 ms | over the origin |"
echo "|---|---|---|---|"
python3 - "$W/pass-rows" <<'PY'
import collections, statistics, sys
p50 = collections.OrderedDict()  # route -> label -> [p50 per round]
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    p50.setdefault(cells[0], {}).setdefault(cells[1], []).append(float(cells[4]))
for route, by in p50.items():
    o = by["origin"]
    for label, runs in by.items():
        over = "–" if label == "origin" else f"{(statistics.median(x / y for x, y in zip(runs, o)) - 1) * 100:+.1f} %"
        print(f"| {route} | {label} | {statistics.median(runs):.2f} | {'**' + over + '**' if label == 'lotecache' else over} |")
PY

# The hop itself, with the drift cancelled: one request at a time, the origin directly, nginx and
# lotecache interleaved request by request in a fresh random order each cycle (on this machine
# the page's own time moves by a third between runs a minute apart, more than a hop costs).
echo
echo "## Pass-through, one request at a time: origin, nginx and lotecache interleaved request by request (examples/hop_latency)"
echo
echo "| route | target | requests | p50 µs | p90 µs | p50 over the origin |"
echo "|---|---|---|---|---|---|"
hop() { # ROUTE PATH REQUESTS ORIGIN_PORT NGINX_PORT LC_PORT
  target/release/examples/hop_latency --requests "$3" --path "$2" \
    "origin directly=127.0.0.1:$4" "nginx=127.0.0.1:$5" "lotecache=127.0.0.1:$6" \
    | awk -F'\t' -v r="$1" '{ over = ($1 == "origin directly") ? "–" : sprintf("%+d µs (%+.1f %%)", $5, $6);
        printf "| %s | %s | %s | %d | %d | %s |\n", r, $1, $2, $3, $4, ($1 == "lotecache") ? "**" over "**" : over }'
}
hop "GET /monitoreo (legacy Flask app)" /monitoreo 2000 $FLASK $NGINX_FLASK $LC_FLASK
hop "GET /__stats (sample origin, ~60 µs)" /__stats 5000 $ORIGIN $NGINX $LC

echo
echo "machine: $(nproc) cores, $(uname -r); oha $(oha --version | awk '{print $2}'), $(nginx -v 2>&1 | cut -d/ -f2)"
