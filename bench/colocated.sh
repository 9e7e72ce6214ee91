#!/usr/bin/env bash
# The deployment the README ships, measured as a user meets it: the legacy Flask app under
# gunicorn (2 sync workers) and lotecache in front of it with config/lotecache.toml, both on this
# machine, under a load that leaves both room (fixed rates well below saturation, so the load
# generator never starves them). Two lotecache instances run side by side — the shipped
# configuration, and the same with EXTRA lines added to its [server] table — and are measured in
# alternation (A B A B A B), each with three loads at once:
#   - the "Descargar JSON" button: hits on a small batch (each one asks the backend's access check)
#   - the same on the 3 MB batch (sendfile)
#   - the Monitoring page itself (passed through to Flask)
# It prints one markdown table: p50 / p90 / p99 per load and instance (mean of the rounds, with
# the lowest and highest round beside it as the run-to-run noise) and any non-200 answers.
#
# Usage: bash bench/colocated.sh ['EXTRA [server] LINES'] [SECONDS_PER_RUN] [ROUNDS]
#   e.g. bash bench/colocated.sh 'pin_workers = true'
# With LOTECACHE_BIN=path, that binary is measured (no build); config/lotecache.toml must suit it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-}
SECS=${2:-15}
ROUNDS=${3:-3}

source bench/lib.sh
bench_tools
# LOTECACHE_BIN measures another build (e.g. one kept from an earlier commit) instead.
if [ -n "${LOTECACHE_BIN:-}" ]; then BIN=$LOTECACHE_BIN; else cargo build --release --quiet --bin lotecache; fi

FLASK=$(free_port)
start_flask $FLASK
# The shipped configuration, on free ports and a work directory; B adds EXTRA to [server].
shipped() { # PORT ADMIN_PORT CACHE_DIR [SERVER_LINES]
  PORT=$1 ADMIN=$2 CACHE=$3 EXTRA_LINES=${4:-} FLASK_PORT=$FLASK python3 -c '
import os
e = os.environ
text = open("config/lotecache.toml").read()
# A setting in EXTRA replaces the shipped line of the same name.
for line in e["EXTRA_LINES"].splitlines():
    name = line.split("=")[0].strip()
    text = "\n".join(l for l in text.split("\n") if not (name and l.split("=")[0].strip() == name))
for old, new in [("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:%s\"\n%s" % (e["PORT"], e["EXTRA_LINES"])),
                 ("url = \"http://127.0.0.1:5000\"", "url = \"http://127.0.0.1:%s\"" % e["FLASK_PORT"]),
                 ("listen = \"127.0.0.1:9091\"", "listen = \"127.0.0.1:%s\"" % e["ADMIN"]),
                 ("dir = \"./lotecache-data\"", "dir = \"%s\"" % e["CACHE"])]:
    assert old in text, old
    text = text.replace(old, new, 1)
print(text)'
}
A=$(free_port); B=$(free_port)
shipped $A $(free_port) "$W/a-cache" > "$W/a.toml"
shipped $B $(free_port) "$W/b-cache" "$EXTRA" > "$W/b.toml"
"$BIN" check-config "$W/b.toml" >/dev/null
"$BIN" serve --config "$W/a.toml" >"$W/a.log" 2>&1 & PIDS+=($!)
"$BIN" serve --config "$W/b.toml" >"$W/b.log" 2>&1 & PIDS+=($!)
for p in $FLASK $A $B; do wait_port $p; done

# A session of a user who may read every batch, as the browser would hold it.
COOKIE=$(curl -s -o /dev/null -D - "http://127.0.0.1:$FLASK/login?usuario=ana" | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\).*/\1/p')
SMALL=/download_batch_results/LOTE-2025-07-001
LARGE=/download_batch_results/LOTE-2025-07-003
for p in $A $B; do for u in $SMALL $LARGE; do  # fill both stores
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: $COOKIE" "http://127.0.0.1:$p$u")" = 200 ] || { echo "warm-up of $u failed" >&2; exit 1; }
done; done

load() { # NAME PORT PATH RATE CONNECTIONS
  oha -c "$5" -q "$4" -z "${SECS}s" --disable-compression --no-tui --output-format json -H "Cookie: $COOKIE" \
    "http://127.0.0.1:$2$3" > "$W/$1.json" 2>/dev/null
}
: > "$W/rows"
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    port=${!side}
    load small $port $SMALL 200 8 & l1=$!
    load large $port $LARGE 10 2 & l2=$!
    load page $port /monitoreo 50 4 & l3=$!
    wait $l1 $l2 $l3
    for l in small large page; do
      jq -r --arg s "$side" --arg l "$l" \
        '[$s, $l, .latencyPercentiles.p50, .latencyPercentiles.p90, .latencyPercentiles.p99,
          ((.statusCodeDistribution | to_entries | map(select(.key != "200") | .value) | add) // 0)] | @tsv' \
        "$W/$l.json" >> "$W/rows"
    done
  done
done

echo "## Co-located: legacy app (gunicorn, 2 sync workers) + lotecache, shipped config; ${SECS}s per run, A B × $ROUNDS"
echo
echo "A: config/lotecache.toml as shipped. B: the same with [server] \`${EXTRA//$'\n'/; }\`."
echo "Loads at once: small batch hits 200 req/s (-c 8), 3 MB batch hits 10 req/s (-c 2), Monitoring page 50 req/s (-c 4)."
echo
echo "| load | side | p50 ms (min–max) | p90 ms (min–max) | p99 ms (min–max) | non-200 |"
echo "|---|---|---|---|---|---|"
python3 - "$W/rows" <<'PY'
import sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    side, load, *v = line.split("\t")
    rows[(load, side)].append([float(x) for x in v])
for load in ["small", "large", "page"]:
    for side in ["A", "B"]:
        r = rows[(load, side)]
        cells = []
        for i in range(3):
            col = [x[i] * 1000 for x in r]
            cells.append(f"{sum(col)/len(col):.2f} ({min(col):.2f}–{max(col):.2f})")
        print(f"| {load} | {side} | " + " | ".join(cells) + f" | {int(sum(x[3] for x in r))} |")
PY
