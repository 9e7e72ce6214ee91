#!/usr/bin/env bash
# The browser end-to-end test: installs what it needs (Debian's chromium and chromedriver,
# a virtualenv with Flask, gunicorn, selenium, pytest), builds lotecache, runs pytest.
# Reuses whatever is already installed. Usage: bash tests/e2e/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "== installing chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

VENV=target/e2e-venv
if [ ! -x "$VENV/bin/pytest" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r examples/legacy-backend/requirements.txt -r tests/e2e/requirements.txt

cargo build --locked --quiet --bin lotecache
export LOTECACHE_BIN="$PWD/target/debug/lotecache"
"$VENV/bin/python" -m pytest -q tests/e2e "$@"
