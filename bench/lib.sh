# Shared by the bench scripts (sourced from the repository root): tools, ports, processes.

VENV=target/e2e-venv   # shared with the end-to-end test: Flask and gunicorn for the legacy app
BIN=$PWD/target/release/lotecache

# Installs what the scripts use and this machine lacks: oha, nginx, jq, Flask and gunicorn.
bench_tools() {
  command -v oha >/dev/null || cargo install oha --locked
  command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
  command -v jq >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r examples/legacy-backend/requirements.txt
}

# A work directory and the processes to stop on exit.
W=$(mktemp -d /tmp/lotecache-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# The legacy app as deployed: Flask under gunicorn, 2 sync workers (no keep-alive), on PORT.
start_flask() {
  "$VENV/bin/python" examples/legacy-backend/seed.py "$W/legacy.db" >/dev/null
  (cd examples/legacy-backend && LEGACY_DB="$W/legacy.db" exec "$PWD/../../$VENV/bin/python" -m gunicorn -w 2 -b "127.0.0.1:$1" app:app 2>"$W/flask.log") & PIDS+=($!)
}

# lotecache's config: its defaults (one runtime worker per core), but no access log, as nginx's.
# A fifth argument adds its lines to [server]: the benches pin the workers, as nginx's 2 worker
# processes are (worker_cpu_affinity auto), with "pin_workers = true".
lotecache_config() { # PORT ADMIN_PORT ORIGIN_PORT CACHE_DIR [SERVER_LINES]
cat <<TOML
[server]
listen = "127.0.0.1:$1"
${5:-}
[origin]
url = "http://127.0.0.1:$3"
[admin]
listen = "127.0.0.1:$2"
[cache]
dir = "$4"
[log]
access = false   # nginx runs with access_log off
TOML
}

# An nginx upstream NAME (127.0.0.1:ORIGIN_PORT, kept alive) and a server on LISTEN_PORT that
# passes everything to it: nginx_pass_block NAME ORIGIN_PORT LISTEN_PORT
nginx_pass_block() {
cat <<NGINX
  upstream $1 { server 127.0.0.1:$2; keepalive 32; }
  server {
    listen 127.0.0.1:$3;
    location / { proxy_pass http://$1; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
NGINX
}

# The start of an nginx config (close the http block after the servers): 2 workers pinned to
# the cores, no access log, sendfile, client keep-alive without a request limit.
nginx_conf_head() {
cat <<NGINX
user root;
worker_processes 2;
worker_cpu_affinity auto;
daemon off;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000;
NGINX
}

# CPU ticks (user+system) of these processes, summed; a process that is gone counts as 0 (nginx's
# cache loader exits during a run). HZ ticks make a second.
ticks() { local total=0 v; for p in "$@"; do v=$(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || true); total=$((total + ${v:-0})); done; echo $total; }
HZ=$(getconf CLK_TCK)
# nginx's master (NGINX_PID, set by the script) and its workers.
nginx_pids() { echo $NGINX_PID $(pgrep -P $NGINX_PID); }
