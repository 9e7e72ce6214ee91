#!/usr/bin/env bash
# The store at scale (issue #26's benchmark): for each size N it builds a store of N small
# batches (≈4.6 KB results documents in the legacy layout, imported with `lotecache cache
# import`), then measures, with the release build and its default settings:
#   - import: time and files per second;
#   - restart with the page cache dropped (when this machine lets us): time from start until
#     the port accepts, until the first hit answers (a key in the middle of the store, served
#     while the index still loads in the background), and until `/readyz` says the index is
#     loaded;
#   - resident memory once the index is loaded (RSS), per entry, beside the empty-store RSS,
#     and again after the random hits (their entries materialized, at most 16384);
#   - disk used by the store, per entry, beside the documents' own bytes;
#   - hits on random keys: oha at a fixed rate, p50 / p99 (uncompressed: --disable-compression),
#     over a working set of 10,000 keys spread over the store (warmed first), and over every
#     key (nearly all read from disk for the first time);
#   - the cache page's requests on the admin port: `GET /entries` sorted by hits (a page of 50)
#     and searched, and `GET /stats`;
#   - `cache ls`, `cache verify` and `cache gc` times.
# Prints one markdown table. Loopback only; every process it starts stops with it.
#
# Usage: bash bench/store-scale.sh [N ...]      (default: 10000 100000 1000000; powers of ten,
# so the random keys cover the store exactly). 1M takes ≈50 min and ≈20 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then SIZES=("$@"); else SIZES=(10000 100000 1000000); fi

source bench/lib.sh
bench_tools
cargo build --release --quiet --bin lotecache

# The shipped rule (its validation ties each document to its id), public: no access check, so
# the hits measure the store, not the backend.
config() { # PORT ADMIN CACHE
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[admin]
listen = "127.0.0.1:$2"
[cache]
dir = "$3"
[log]
access = false
$(python3 - <<'PY'
text = open("config/lotecache.toml").read()
rules = text[text.index("\n[[rules]]") + 1:]
# the access check goes (its table: from its header line to the next table); the rule is public
lines, out, skipping = rules.split("\n"), [], False
for line in lines:
    if line.strip() == "[rules.auth]":
        skipping = True
        continue
    if skipping and line.startswith("["):
        skipping = False
    if not skipping:
        out.append(line)
print("\n".join(out).replace('name = "batch-results"\n', 'name = "batch-results"\naccess = "public"\n', 1))
PY
)
TOML
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo yes || echo no; }
now_ms() { date +%s%3N; }
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$1/status; }

echo "| entries | import s (files/s) | page cache dropped | start → listening ms | start → first hit ms | start → index loaded s | RSS loaded MiB (per entry B) | RSS after hits MiB | disk MiB (per entry KiB; documents KiB) | hits, working set of 10k: p50 / p99 ms | hits, every key, cold: p50 / p99 ms | page: entries by hits / search / stats ms | ls s | verify s | gc s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
EMPTY_RSS=
for n in "${SIZES[@]}"; do
  saved="$W/saved-$n"; cache="$W/cache-$n"; mkdir -p "$saved"
  python3 - "$saved" "$n" <<'PY'
import json, random, sys
out, n = sys.argv[1], int(sys.argv[2])
words = ("factura importe total cliente fecha proveedor dirección código pago documento página firma "
         "contrato cláusula entrega pedido número cantidad descripción registro expediente").split()
rng = random.Random(7)
# 600 processed-file texts drawn once; each batch takes six of them (a million batches of
# freshly drawn words would take longer to write than to import).
texts = [" ".join(rng.choice(words) for _ in range(100)) for _ in range(600)]
for i in range(n):
    lote = f"B-{i:07d}"
    files = [{"lote_id": lote, "nombre_archivo": f"doc_{j}.pdf", "paginas": rng.randint(1, 9),
              "texto_extraido": texts[rng.randrange(600)],
              "confianza": round(rng.uniform(0.8, 1), 3), "idioma": "es"} for j in range(6)]
    doc = {"metadata": {"lote_id": lote, "fecha_creacion": "2025-07-14T09:00:00", "estado": "completado",
                        "total_archivos": len(files)}, "archivos_procesados": files}
    with open(f"{out}/{lote}_resultados.json", "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2)
PY
  docs_kib=$(du -sk --apparent-size "$saved" | cut -f1)
  PORT=$(free_port); ADMIN=$(free_port)
  config $PORT $ADMIN "$cache" > "$W/lc-$n.toml"
  t0=$(now_ms)
  "$BIN" cache import --config "$W/lc-$n.toml" "$saved" > "$W/import-$n.txt"
  import_s=$(python3 -c "print(round(($(now_ms) - $t0) / 1000, 1))")
  rm -rf "$saved"
  if [ -z "$EMPTY_RSS" ]; then  # the empty store's RSS, once
    config $(free_port) $(free_port) "$W/empty" > "$W/empty.toml"; EP=$(grep -o '127.0.0.1:[0-9]*' "$W/empty.toml" | head -1 | cut -d: -f2)
    "$BIN" serve --config "$W/empty.toml" 2>/dev/null & pid=$!; PIDS+=($pid); wait_port $EP; EMPTY_RSS=$(rss_kib $pid); kill $pid; wait $pid 2>/dev/null || true
  fi
  dropped=$(drop_caches)
  t0=$(now_ms)
  "$BIN" serve --config "$W/lc-$n.toml" 2>"$W/serve-$n.log" & pid=$!; PIDS+=($pid)
  until (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; do sleep 0.005; done
  listening=$(( $(now_ms) - t0 ))
  first=$(curl -s -o /dev/null -D - "http://127.0.0.1:$PORT/download_batch_results/$(printf 'B-%07d' $((n / 2)))" \
    | tr -d '\r' | awk -F'; ' 'tolower($0) ~ /^cache-status:/ {print $2}')
  first_hit="$(( $(now_ms) - t0 )) ($first)"
  until curl -s "http://127.0.0.1:$ADMIN/stats" | jq -e '.store.index.loaded' >/dev/null; do sleep 0.1; done
  loaded_s=$(python3 -c "print(round(($(now_ms) - $t0) / 1000, 1))")
  rss=$(rss_kib $pid)
  disk_kib=$(du -sk "$cache" | cut -f1)
  # Hits, two ways. Every key: random ids B-0000000 .. B-(n-1) (n a power of ten: a regex over
  # the id's digits), nearly all of them read from disk for the first time since the page cache
  # was dropped. A working set: 10,000 ids spread evenly over the store (every n/10000th),
  # each requested once to warm it, then measured: what the index costs as the store grows.
  hits() { # REGEX OUT
    oha -z 10s -q 2000 -c 8 --disable-compression --no-tui --output-format json --rand-regex-url "$1" > "$2" 2>/dev/null || true
    jq -r '"\(.latencyPercentiles.p50*1000*100|round/100) / \(.latencyPercentiles.p99*1000*100|round/100) (\(.statusCodeDistribution["200"] // 0) ok)"' "$2"
  }
  read -r every working < <(python3 -c "
d = len(str($n - 1))  # digits of n - 1
base = 'http://127[.]0[.]0[.]1:$PORT/download_batch_results/B-' + '0' * (7 - d)
print(base + '[0-9]' * d, base + '[0-9]' * 4 + '0' * (d - 4))")
  cold=$(hits "$every" "$W/oha-every-$n.json")
  # Each key of the working set once, through the proxy (`cache warm` reads every body).
  python3 -c "step = $n // 10000; print('\n'.join(f'B-{i * step:07d}' for i in range(10000)))" > "$W/working-$n.txt"
  "$BIN" cache warm "$W/working-$n.txt" --via "http://127.0.0.1:$PORT" --concurrency 8 > /dev/null
  warm=$(hits "$working" "$W/oha-working-$n.json")
  page_ms() { curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$ADMIN$1" | awk '{printf "%.0f", $1 * 1000}'; }
  page="$(page_ms '/entries?sort=hits&order=desc&limit=50') / $(page_ms '/entries?q=B-00012&limit=50') / $(page_ms '/stats')"
  rss_hits=$(rss_kib $pid)
  kill $pid; wait $pid 2>/dev/null || true
  t0=$(now_ms); "$BIN" cache ls --cache-dir "$cache" --json > /dev/null; ls_s=$(python3 -c "print(round(($(now_ms) - $t0) / 1000, 2))")
  t0=$(now_ms); "$BIN" cache verify --cache-dir "$cache" > /dev/null; verify_s=$(python3 -c "print(round(($(now_ms) - $t0) / 1000, 2))")
  t0=$(now_ms); "$BIN" cache gc --cache-dir "$cache" > /dev/null; gc_s=$(python3 -c "print(round(($(now_ms) - $t0) / 1000, 2))")
  python3 - <<PY
n, rss, empty, disk, docs = $n, $rss, $EMPTY_RSS, $disk_kib, $docs_kib
print(f"| {n} | $import_s ({n / max($import_s, 0.001):.0f}) | $dropped | $listening | $first_hit | $loaded_s | "
      f"{rss / 1024:.0f} ({(rss - empty) * 1024 / n:.0f}) | {$rss_hits / 1024:.0f} | {disk / 1024:.0f} ({disk / n:.1f}; {docs / n:.1f}) | "
      f"$warm | $cold | $page | $ls_s | $verify_s | $gc_s |")
PY
  rm -rf "$cache"
done
