#!/usr/bin/env bash
# Every test suite, in order: Rust unit and integration tests (one build, reused after),
# the browser end-to-end test (installs chromium, chromedriver and a Python virtualenv when
# missing), the scale-out test (installs garage and nginx when missing), then the deploy
# files' lint. This is the test command README.md gives and
# .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test --locked"
cargo test --locked

echo "== end-to-end: Flask + gunicorn + lotecache + headless Chromium"
bash tests/e2e/run.sh

echo "== scale-out: 3-node Garage + 3 replicas + nginx (consistent hash)"
bash tests/scaleout/run.sh

echo "== deploy files"
if ! command -v systemd-analyze >/dev/null && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null 2>&1 || true
fi
# promtool checks the alert rules (Debian's prometheus package ships it).
if ! command -v promtool >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
bash deploy/lint.sh target/debug/lotecache target/e2e-venv/bin/python
