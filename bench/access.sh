#!/usr/bin/env bash
# What the decision cache and warm-on-completion buy in the deployment the README ships: the
# legacy Flask app under gunicorn (2 sync workers, its defaults otherwise) and lotecache in
# front of it with config/lotecache.toml (its defaults), on this machine, in one run.
#
# 1. Hits of a logged-in user (oha -c 16 --disable-compression, a session cookie, the small
#    batch LOTE-2025-07-001): three lotecache instances side by side, in alternation (A B C, 2
#    rounds) — the shipped configuration with the decision cache off (cache_ttl = "0s": every
#    hit asks the backend), the shipped configuration (decision cache on), and the same with
#    access = "public" instead of the access check (no check at all: the ceiling). req/s, p50,
#    p99, and the access checks that reached the backend.
# 2. The first click on a batch that just finished (time to first byte, curl): a backend that
#    tells lotecache on completion (LOTECACHE_ADMIN_URL set: POST /warm) and one that does not,
#    each with its own lotecache; the batch is marked completado on the backend, then clicked
#    (for the warmed one, once its entry is stored). GEN_DELAY is the backend's default, 1 s.
#
# Usage: bash bench/access.sh [SECONDS_PER_RUN]   (default 10; about 3 minutes after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=2

source bench/lib.sh
bench_tools
cargo build --release --quiet --bin lotecache
export LOTECACHE_SERVICE_TOKEN=bench-service-token LOTECACHE_ADMIN_TOKEN=bench-admin-token

# The shipped configuration on free ports, with sed-like edits: variant off | on | public.
shipped() { # VARIANT PORT ADMIN_PORT ORIGIN_PORT CACHE_DIR
  VARIANT=$1 PORT=$2 ADMIN=$3 ORIGIN=$4 CACHE=$5 python3 -c '
import os, re
e = os.environ
text = open("config/lotecache.toml").read()
for old, new in [("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:%s\"" % e["PORT"]),
                 ("url = \"http://127.0.0.1:5000\"", "url = \"http://127.0.0.1:%s\"" % e["ORIGIN"]),
                 ("listen = \"127.0.0.1:9091\"", "listen = \"127.0.0.1:%s\"" % e["ADMIN"]),
                 ("dir = \"./lotecache-data\"", "dir = \"%s\"" % e["CACHE"])]:
    assert old in text, old
    text = text.replace(old, new, 1)
if e["VARIANT"] == "off":
    assert "cache_ttl = \"5s\"" in text
    text = text.replace("cache_ttl = \"5s\"", "cache_ttl = \"0s\"")
if e["VARIANT"] == "public":
    # No [rules.auth] table: anyone who reaches the proxy is served.
    text, n = re.subn(r"\n\[rules\.auth\]\n(?:[^\[\n][^\n]*\n|\n)*", "\n", text)
    assert n == 1
    text = text.replace("name = \"batch-results\"", "name = \"batch-results\"\naccess = \"public\"", 1)
print(text)'
}

# Part 1: one backend, three lotecaches.
FLASK=$(free_port); OFF=$(free_port); ON=$(free_port); PUB=$(free_port)
start_flask $FLASK
declare -A ADMIN_OF=([off]=$(free_port) [on]=$(free_port) [public]=$(free_port))
for v in off:$OFF on:$ON public:$PUB; do
  shipped ${v%%:*} ${v#*:} ${ADMIN_OF[${v%%:*}]} $FLASK "$W/${v%%:*}-cache" > "$W/${v%%:*}.toml"
  "$BIN" check-config "$W/${v%%:*}.toml" >/dev/null
  "$BIN" serve --config "$W/${v%%:*}.toml" 2>"$W/${v%%:*}.log" & PIDS+=($!)
done
for p in $FLASK $OFF $ON $PUB; do wait_port $p; done
COOKIE=$(curl -s -o /dev/null -D - "http://127.0.0.1:$FLASK/login?usuario=ana" | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p')
SMALL=/download_batch_results/LOTE-2025-07-001
for p in $OFF $ON $PUB; do curl -sf -o /dev/null -H "Cookie: $COOKIE" "http://127.0.0.1:$p$SMALL"; done

: > "$W/rows"
for round in $(seq $ROUNDS); do
  for t in "decision cache off (cache_ttl = 0s)|$OFF" "decision cache on (shipped)|$ON" "access = public (no check)|$PUB"; do
    label=${t%%|*}; port=${t#*|}
    oha -c 16 -z ${SECS}s --disable-compression --no-tui --output-format json -H "Cookie: $COOKIE" \
      "http://127.0.0.1:$port$SMALL" > "$W/oha.json" 2>/dev/null
    jq -r --arg l "$label" '[$l, .summary.requestsPerSec, .latencyPercentiles.p50 * 1000, .latencyPercentiles.p99 * 1000,
      (.statusCodeDistribution["200"] // 0), ([.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0)] | @tsv' \
      "$W/oha.json" >> "$W/rows"
  done
done
# Access checks that reached the backend, per instance, from lotecache's own metrics.
asked() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^lotecache_access_checks_total\{result="allow",source="asked"\}/ {print $2}'; }

# Part 2: the first click on a batch that just finished, with and without warm-on-completion.
FLASK_W=$(free_port); FLASK_N=$(free_port); LC_W=$(free_port); LC_N=$(free_port); ADMIN_W=$(free_port)
cp "$W/legacy.db" "$W/legacy-w.db"; cp "$W/legacy.db" "$W/legacy-n.db"
(cd examples/legacy-backend && LEGACY_DB="$W/legacy-w.db" LOTECACHE_ADMIN_URL="http://127.0.0.1:$ADMIN_W" \
  exec "$PWD/../../$VENV/bin/python" -m gunicorn -w 2 -b "127.0.0.1:$FLASK_W" app:app 2>"$W/flask-w.log") & PIDS+=($!)
(cd examples/legacy-backend && LEGACY_DB="$W/legacy-n.db" \
  exec "$PWD/../../$VENV/bin/python" -m gunicorn -w 2 -b "127.0.0.1:$FLASK_N" app:app 2>"$W/flask-n.log") & PIDS+=($!)
shipped on $LC_W $ADMIN_W $FLASK_W "$W/w-cache" > "$W/w.toml"
shipped on $LC_N $(free_port) $FLASK_N "$W/n-cache" > "$W/n.toml"
"$BIN" serve --config "$W/w.toml" 2>"$W/w.log" & PIDS+=($!)
"$BIN" serve --config "$W/n.toml" 2>"$W/n.log" & PIDS+=($!)
for p in $FLASK_W $FLASK_N $LC_W $LC_N; do wait_port $p; done
: > "$W/ttfb"
for id in LOTE-2025-07-005 LOTE-2025-07-006; do
  for t in "with warm on completion=$FLASK_W=$LC_W=$ADMIN_W" "without=$FLASK_N=$LC_N="; do
    IFS== read -r label flask lc admin <<< "$t"
    c=$(curl -s -o /dev/null -D - "http://127.0.0.1:$flask/login?usuario=ana" | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p')
    curl -sf -o /dev/null -X POST -H "Cookie: $c" "http://127.0.0.1:$flask/api/lotes/$id/completar"
    if [ -n "$admin" ]; then  # the warm's fill: the user clicks once it is stored
      for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$admin/entries/${id}_resultados.json" && break; sleep 0.05; done
    fi
    r=$(curl -s -o /dev/null -H "Cookie: $c" -D "$W/h" -w '%{time_starttransfer}' "http://127.0.0.1:$lc/download_batch_results/$id")
    cs=$(awk 'tolower($1) == "cache-status:" {sub(/^[^:]*: /, ""); print}' "$W/h" | tr -d '\r')
    echo -e "$label\t$id\t$r\t$cs" >> "$W/ttfb"
  done
done

echo "## Access checks and warm on completion: bench/access.sh (legacy app under gunicorn, 2 sync workers; shipped config)"
echo
echo "### Hits of a logged-in user: oha -c 16, ${SECS}s per run, A B C in $ROUNDS rounds (mean)"
echo
echo "| lotecache | req/s | p50 ms | p99 ms | non-200 | vs public |"
echo "|---|---|---|---|---|---|"
python3 - "$W/rows" <<'PY'
import collections, sys
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    l, *v = line.rstrip("\n").split("\t")
    rows.setdefault(l, []).append([float(x) for x in v])
mean = {l: [sum(c) / len(c) for c in zip(*r)] for l, r in rows.items()}
ceiling = mean["access = public (no check)"][0]
for l, (rps, p50, p99, ok, bad) in mean.items():
    print(f"| {l} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {bad:.0f} | {rps / ceiling:.2f}× |")
PY
echo
echo "Access checks asked of the backend during the whole run (\`lotecache_access_checks_total{result=\"allow\",source=\"asked\"}\`):"
echo "decision cache off: $(asked ${ADMIN_OF[off]}); on: $(asked ${ADMIN_OF[on]}); public: $(asked ${ADMIN_OF[public]:-0} || echo 0)"
echo
echo "### The first click on a batch that just finished (curl, time to first byte)"
echo
echo "| backend | batch | TTFB ms | Cache-Status |"
echo "|---|---|---|---|"
awk -F'\t' '{printf "| %s | %s | %.1f | `%s` |\n", $1, $2, $3 * 1000, $4}' "$W/ttfb"
echo
echo "machine: $(nproc) cores, $(uname -r); oha $(oha --version | awk '{print $2}'); gunicorn $("$VENV/bin/python" -m gunicorn --version | tr -d '()' | awk '{print $NF}')"
