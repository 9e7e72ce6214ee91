#!/usr/bin/env bash
# Compressed downloads: lotecache's precompressed variants (identity, br, gzip) beside nginx
# proxy_cache compressing on the fly (gzip on, levels 1 and 6), every server at its defaults
# (lotecache: no settings beyond addresses and the access log off, as nginx's; nginx: Debian's
# packaged defaults, worker_processes auto, no CPU affinity), in one run on this machine.
#
# Documents: 256 KB and 16 MB batches in the legacy layout built from real Spanish prose with
# OCR-like noise (bench/spanish_corpus.py says how; the prose comes from Debian's manpages-es
# and debian-reference-es, downloaded with apt-get download).
#
# Everything runs in two network namespaces this script creates and removes: the servers (a
# static origin serving the documents, lotecache, nginx) in one, the single client of the
# transfer timings in the other, with link-local addresses, joined by an emulated link of
# 50 Mbit/s (tbf on each end) and 20 ms RTT (10 ms each way, added by bench/linkemu.py, which
# carries the frames between a TAP device in each namespace: this machine's kernel has no
# netem). TCP runs end to end over it. Nothing leaves the machine.
#
# Reports: the size of each representation; hit CPU µs per request and req/s under oha -c 16
# (inside the server namespace, on its loopback: the CPU of the proxies, not of the link) for
# identity, br and gzip; and the time to last byte of one download over the emulated link
# (curl, median of 5), each representation decoded and checked against the document once.
#
# Usage: bash bench/compression.sh [SECONDS_PER_RUN]   (default 5; about 5 minutes after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=2
REPS=5

source bench/lib.sh
bench_tools
command -v curl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl
"$VENV/bin/pip" install -q brotli
cargo build --release --quiet --bin lotecache

echo "== corpus" >&2
(cd "$W" && apt-get download -qq manpages-es debian-reference-es 2>/dev/null)
mkdir -p "$W/src" "$W/docs"
for deb in "$W"/*.deb; do dpkg-deb -x "$deb" "$W/src/$(basename "$deb" .deb)"; done
python3 bench/spanish_corpus.py "$W/src" "$W/docs" es-256kb:262144 es-16mb:16777216

echo "== namespaces" >&2
SRV=lcb-srv-$$; CLI=lcb-cli-$$
ip netns add $SRV; ip netns add $CLI
netns_cleanup() { ip netns del $SRV 2>/dev/null || true; ip netns del $CLI 2>/dev/null || true; }
trap 'cleanup; netns_cleanup' EXIT
# The link: a TAP device in each namespace, joined by bench/linkemu.py (10 ms each way; this
# kernel has no netem), the rate set by tbf on each device's egress.
ip -n $SRV tuntap add dev lcb-s mode tap; ip -n $CLI tuntap add dev lcb-c mode tap
ip -n $SRV addr add 169.254.77.1/30 dev lcb-s; ip -n $CLI addr add 169.254.77.2/30 dev lcb-c
for ns in $SRV $CLI; do ip -n $ns link set lo up; done
ip -n $SRV link set lcb-s up; ip -n $CLI link set lcb-c up
ip netns exec $SRV tc qdisc add dev lcb-s root tbf rate 50mbit burst 64kb limit 512kb
ip netns exec $CLI tc qdisc add dev lcb-c root tbf rate 50mbit burst 64kb limit 512kb
python3 bench/linkemu.py $SRV lcb-s $CLI lcb-c 10 & PIDS+=($!)
in_srv() { ip netns exec $SRV "$@"; }
in_cli() { ip netns exec $CLI "$@"; }

ORIGIN=18001; LC=18002; ADMIN=18003; NG1=18004; NG6=18005; HOST=169.254.77.1
cat > "$W/origin.py" <<'PY'
import http.server, pathlib, sys
DOCS = pathlib.Path(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        f = DOCS / self.path.rsplit("/", 1)[-1]
        if not self.path.startswith("/download_batch_results/") or not f.is_file():
            self.send_error(404); return
        body = f.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
# Servers started with `ip netns exec` itself (it execs them): $! is the server's pid.
ip netns exec $SRV python3 "$W/origin.py" $ORIGIN "$W/docs" & PIDS+=($!)

mkdir -p "$W/nginx-cache"
nginx_server() { # PORT LEVEL
cat <<NGINX
  server {
    listen 0.0.0.0:$1;
    gzip on; gzip_comp_level $2; gzip_types application/json;
    location /download_batch_results/ {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Accept-Encoding "";
      proxy_cache lotes;
      proxy_cache_key \$uri;
      proxy_cache_valid 200 1d;
    }
  }
NGINX
}
cat > "$W/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 768; }
http {
  access_log off;
  sendfile on; tcp_nopush on;
  proxy_cache_path $W/nginx-cache levels=1:2 keys_zone=lotes:10m max_size=10g inactive=1d use_temp_path=off;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 32; }
$(nginx_server $NG1 1)
$(nginx_server $NG6 6)
}
NGINX
ip netns exec $SRV nginx -c "$W/nginx.conf" & PIDS+=($!); NGINX_PID=$!
cat > "$W/lc.toml" <<TOML
[server]
listen = "0.0.0.0:$LC"
[origin]
url = "http://127.0.0.1:$ORIGIN"
[admin]
listen = "127.0.0.1:$ADMIN"
[cache]
dir = "$W/lc-cache"
[log]
access = false   # nginx runs with access_log off
TOML
ip netns exec $SRV "$BIN" serve --config "$W/lc.toml" 2>"$W/lc.log" & PIDS+=($!); LC_PID=$!
for p in $ORIGIN $LC $NG1 $NG6; do
  for _ in $(seq 200); do in_srv bash -c "exec 3<>/dev/tcp/127.0.0.1/$p" 2>/dev/null && break; sleep 0.05; done
done

# Warm both caches, wait for lotecache's variants.
for id in es-256kb es-16mb; do
  for port in $LC $NG1 $NG6; do in_srv curl -s -o /dev/null "http://127.0.0.1:$port/download_batch_results/$id"; done
  for _ in $(seq 600); do
    n=$(in_srv curl -s "http://127.0.0.1:$ADMIN/entries/${id}_resultados.json" | jq '.variants | length' 2>/dev/null || echo 0)
    [ "$n" = 2 ] && break; sleep 0.1
  done
  [ "$n" = 2 ] || { echo "no variants of $id" >&2; exit 1; }
done

# Targets: label, port, Accept-Encoding (empty: none), the server's pids.
TARGETS=("lotecache identity|$LC||lc" "lotecache br|$LC|br|lc" "lotecache gzip|$LC|gzip|lc"
         "nginx identity|$NG1||ng" "nginx gzip 1|$NG1|gzip|ng" "nginx gzip 6|$NG6|gzip|ng")
pids_of() { [ "$1" = lc ] && echo $LC_PID || nginx_pids; }

echo "== sizes and checks" >&2
: > "$W/sizes"
for id in es-256kb es-16mb; do
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r label port ae _ <<< "$t"
    in_srv curl -s -H "Accept-Encoding: ${ae:-identity}" -D "$W/h" -o "$W/body" "http://127.0.0.1:$port/download_batch_results/$id"
    enc=$(awk 'tolower($1) == "content-encoding:" {print $2}' "$W/h" | tr -d '\r')
    [ "$enc" = "${ae}" ] || { echo "$label $id: Content-Encoding '$enc', expected '$ae'" >&2; exit 1; }
    "$VENV/bin/python" - "$W/body" "$W/docs/$id" "$ae" <<'PY'
import brotli, gzip, sys
body, doc, coding = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), sys.argv[3]
decoded = {"br": brotli.decompress, "gzip": gzip.decompress}.get(coding, lambda b: b)(body)
assert decoded == doc, f"{coding or 'identity'} body does not decode to the document"
PY
    echo -e "$id\t$label\t$(stat -c %s "$W/body")" >> "$W/sizes"
  done
done

echo "== hits: CPU and req/s" >&2
: > "$W/cpu"
for id in es-256kb es-16mb; do
  for round in $(seq $ROUNDS); do
    for t in "${TARGETS[@]}"; do
      IFS='|' read -r label port ae who <<< "$t"
      pids=$(pids_of $who)
      t0=$(ticks $pids)
      in_srv oha -c 16 -z ${SECS}s --disable-compression --no-tui --output-format json ${ae:+-H "Accept-Encoding: $ae"} \
        "http://127.0.0.1:$port/download_batch_results/$id" > "$W/oha.json" 2>/dev/null
      t1=$(ticks $pids)
      n=$(jq '.statusCodeDistribution["200"] // 0' "$W/oha.json")
      rps=$(jq '.summary.requestsPerSec' "$W/oha.json")
      # Every response the size of the representation asked for (oha counts wire bytes).
      per=$(jq '.summary.sizePerRequest // 0' "$W/oha.json")
      want=$(awk -F'\t' -v d=$id -v l="$label" '$1 == d && $2 == l {print $3}' "$W/sizes")
      awk -v p="$per" -v w="$want" 'BEGIN { exit !(p > 0.95 * w && p < 1.05 * w) }' || { echo "$id $label: $per bytes per response, expected $want" >&2; exit 1; }
      echo -e "$id\t$label\t$rps\t$(( t1 - t0 ))\t$n" >> "$W/cpu"
    done
  done
done

echo "== time to last byte over the emulated link" >&2
in_cli curl -s -o /dev/null "http://$HOST:$LC/"   # neighbour discovery first: its round trip is not the link's
RTT_MS=$(in_cli curl -s -o /dev/null -w '%{time_connect}' "http://$HOST:$LC/" | awk '{printf "%.1f", $1 * 1000}')
echo "TCP connect over the link: $RTT_MS ms (one round trip)" >&2
: > "$W/ttlb"
for id in es-256kb es-16mb; do
  for rep in $(seq $REPS); do
    for t in "${TARGETS[@]}"; do
      IFS='|' read -r label port ae _ <<< "$t"
      s=$(in_cli curl -s -o /dev/null -H "Accept-Encoding: ${ae:-identity}" -w '%{time_total}' "http://$HOST:$port/download_batch_results/$id")
      echo -e "$id\t$label\t$s" >> "$W/ttlb"
    done
  done
done

python3 - "$W/sizes" "$W/cpu" "$W/ttlb" "$HZ" "$SECS" "$ROUNDS" "$REPS" <<'PY'
import collections, statistics, sys
sizes_f, cpu_f, ttlb_f, hz, secs, rounds, reps = sys.argv[1:]
hz = int(hz)
sizes = {}
for line in open(sizes_f):
    d, l, n = line.split("\t")
    sizes[(d, l)] = int(n)
cpu = collections.defaultdict(list)
for line in open(cpu_f):
    d, l, rps, ticks, n = line.split("\t")
    cpu[(d, l)].append((float(rps), int(ticks), int(n)))
ttlb = collections.defaultdict(list)
for line in open(ttlb_f):
    d, l, s = line.split("\t")
    ttlb[(d, l)].append(float(s))
labels = ["lotecache identity", "lotecache br", "lotecache gzip", "nginx identity", "nginx gzip 1", "nginx gzip 6"]
print(f"## Compressed downloads: bench/compression.sh (oha -c 16, {secs}s × {rounds} rounds per row; "
      f"link: 50 Mbit/s, 20 ms RTT, median of {reps})")
print()
print("| document | server, representation | bytes sent | ratio | req/s | CPU µs/req | time to last byte, ms | vs lotecache identity |")
print("|---|---|---|---|---|---|---|---|")
for d in ["es-256kb", "es-16mb"]:
    ident = sizes[(d, "lotecache identity")]
    base = statistics.median(ttlb[(d, "lotecache identity")])
    for l in labels:
        runs = cpu[(d, l)]
        rps = sum(r for r, _, _ in runs) / len(runs)
        n = sum(n for _, _, n in runs)
        us = sum(t for _, t, _ in runs) / hz * 1e6 / n if n else float("nan")
        t = statistics.median(ttlb[(d, l)])
        print(f"| {d} | {l} | {sizes[(d, l)]:,} | {ident / sizes[(d, l)]:.2f}× | {rps:,.0f} | {us:,.0f} | {t * 1000:,.0f} | {base / t:.2f}× sooner |")
PY
echo
echo "link: 50 Mbit/s each way, TCP connect $RTT_MS ms (one round trip)"
echo "machine: $(nproc) cores, $(uname -r); oha $(oha --version | awk '{print $2}'), $(nginx -v 2>&1 | cut -d/ -f2), curl $(curl --version | awk 'NR==1 {print $2}')"
