#!/usr/bin/env bash
# What one proxy hop adds to a request that is not cached, one request at a time (so the figure
# is the hop's own latency, not how 2 shared cores are divided under load).
#
# Compares, side by side in one run (examples/hop_latency: the targets interleaved request by
# request, in a fresh random order each cycle; three rounds, median of the rounds' p50):
#   - the legacy Flask app's Monitoring page under gunicorn (sync workers: a new origin
#     connection for every request): the origin directly, nginx, lotecache, and
#     examples/hyper_floor (the smallest hyper + tokio pass-through proxy), also with its
#     --preconnect (an origin connection opened ahead of the next request);
#   - the sample origin's trivial route (keep-alive): the origin directly, nginx and lotecache
#     on pooled connections, then nginx and hyper_floor on a new connection per request.
#
# Usage: bash bench/passthrough.sh [REQUESTS_PER_RUN]   (default 2000; ~2 min, loopback only)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}

source bench/lib.sh
bench_tools
cargo build --release --quiet --bin lotecache --example hyper_floor --example hop_latency
FLOOR=$PWD/target/release/examples/hyper_floor
HOP=$PWD/target/release/examples/hop_latency

FLASK=$(free_port); ORIGIN=$(free_port)
NGINX_FLASK=$(free_port); NGINX=$(free_port); NGINX_NEW=$(free_port)
LC_FLASK=$(free_port); LC=$(free_port)
FLOOR_FLASK=$(free_port); FLOOR_PRE=$(free_port); FLOOR_NEW=$(free_port)
start_flask $FLASK
"$BIN" sample-origin --listen 127.0.0.1:$ORIGIN 2>"$W/origin.log" & PIDS+=($!)
{ nginx_conf_head; nginx_pass_block flask $FLASK $NGINX_FLASK; nginx_pass_block origin $ORIGIN $NGINX; cat <<NGINX
  upstream origin_new { server 127.0.0.1:$ORIGIN; }
  server {
    listen 127.0.0.1:$NGINX_NEW;
    location / { proxy_pass http://origin_new; }
  }
}
NGINX
} > "$W/nginx.conf"
nginx -c "$W/nginx.conf" & PIDS+=($!)
lotecache_config $LC_FLASK $(free_port) $FLASK "$W/lc-flask-cache" "pin_workers = true" > "$W/lc-flask.toml"
lotecache_config $LC $(free_port) $ORIGIN "$W/lc-cache" "pin_workers = true" > "$W/lc.toml"
"$BIN" serve --config "$W/lc-flask.toml" 2>"$W/lc-flask.log" & PIDS+=($!)
"$BIN" serve --config "$W/lc.toml" 2>"$W/lc.log" & PIDS+=($!)
"$FLOOR" --listen 127.0.0.1:$FLOOR_FLASK --origin 127.0.0.1:$FLASK & PIDS+=($!)
"$FLOOR" --listen 127.0.0.1:$FLOOR_PRE --origin 127.0.0.1:$FLASK --preconnect & PIDS+=($!)
"$FLOOR" --listen 127.0.0.1:$FLOOR_NEW --origin 127.0.0.1:$ORIGIN & PIDS+=($!)
for p in $FLASK $ORIGIN $NGINX_FLASK $NGINX $NGINX_NEW $LC_FLASK $LC $FLOOR_FLASK $FLOOR_PRE $FLOOR_NEW; do wait_port $p; done

FLASK_TARGETS=("origin directly=$FLASK" "nginx=$NGINX_FLASK" "lotecache=$LC_FLASK" "hyper_floor=$FLOOR_FLASK"
  "hyper_floor --preconnect=$FLOOR_PRE")
SAMPLE_TARGETS=("origin directly=$ORIGIN" "nginx, pooled=$NGINX" "lotecache, pooled=$LC"
  "nginx, new connection each=$NGINX_NEW" "hyper_floor, new connection each=$FLOOR_NEW")
# measure ROUTE REQUESTS PATH TARGETS... → appends "route<TAB>label<TAB>p50 µs" to rows.
# The targets are interleaved request by request (examples/hop_latency), so the machine's drift
# falls on all of them alike; a non-200 answer stops the run.
measure() {
  local route=$1 n=$2 path=$3; shift 3
  local targets=(); for t in "$@"; do targets+=("${t%=*}=127.0.0.1:${t##*=}"); done
  "$HOP" --requests "$n" --path "$path" "${targets[@]}" | awk -F'\t' -v r="$route" '{ print r "\t" $1 "\t" $3 }' >> "$W/rows"
}
: > "$W/rows"
for round in 1 2 3; do
  measure "GET /monitoreo (legacy Flask app, gunicorn)" "$N" /monitoreo "${FLASK_TARGETS[@]}"
  measure "GET /__stats (sample origin)" "$((N * 5 / 2))" /__stats "${SAMPLE_TARGETS[@]}"
done

echo "## Pass-through, one request at a time, targets interleaved: $N requests per target and round on the Flask page ($((N * 5 / 2)) on the trivial route), median p50 of 3 rounds"
echo
echo "| route | target | p50 µs | over the origin directly | over nginx |"
echo "|---|---|---|---|---|"
python3 - "$W/rows" <<'PY'
import sys, collections, statistics
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    route, label, p50 = line.rstrip("\n").split("\t")
    rows.setdefault((route, label), []).append(float(p50))
for (route, label), runs in rows.items():
    p50 = statistics.median(runs)
    direct = statistics.median(rows[(route, "origin directly")])
    # nginx on the same kind of origin connection (pooled or new each time) as this target
    proxies = [l for (r2, l) in rows if r2 == route and l.startswith("nginx")]
    same = [l for l in proxies if ("new connection" in l) == ("new connection" in label)]
    nginx = statistics.median(rows[(route, (same or proxies)[0])])
    over = lambda base: "–" if label == "origin directly" or base == p50 else f"{p50 - base:+.0f} µs ({(p50 / base - 1) * 100:+.1f} %)"
    print(f"| {route} | {label} | {p50:.0f} | {over(direct)} | {'–' if label.startswith('nginx') else over(nginx)} |")
PY
echo
echo "machine: $(nproc) cores, $(uname -r); oha $(oha --version | awk '{print $2}'), $(nginx -v 2>&1 | cut -d/ -f2)"
