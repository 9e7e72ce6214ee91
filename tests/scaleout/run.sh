#!/usr/bin/env bash
# The scale-out test: a 3-node Garage cluster on loopback, three lotecache replicas sharing
# one bucket, nginx with deploy/nginx-replicas.conf in front. Installs what it needs and
# reuses what is there: garage (cargo install, only when absent: ~8 min on 2 cores), nginx
# (Debian's nginx-light), a virtualenv with pytest and boto3. Usage: bash tests/scaleout/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

GARAGE_VERSION=2.5.0
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v garage >/dev/null; then
  echo "== installing garage $GARAGE_VERSION (cargo install; once per machine)"
  cargo install garage --locked --version "$GARAGE_VERSION" --quiet
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "== installing nginx-light"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi

VENV=target/e2e-venv
if [ ! -x "$VENV/bin/pytest" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r tests/scaleout/requirements.txt

cargo build --locked --quiet --bin lotecache
export LOTECACHE_BIN="$PWD/target/debug/lotecache"
"$VENV/bin/python" -m pytest -q tests/scaleout "$@"
