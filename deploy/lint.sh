#!/usr/bin/env bash
# Lints the deploy files with what this machine has: the systemd unit with systemd-analyze
# (ExecStart pointed at the built binary, since /usr/local/bin is not installed here), the
# compose file as YAML with its expected structure (the Grafana dashboard as JSON), the alert
# rules and the Prometheus config with promtool. Usage: bash deploy/lint.sh BINARY PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/lotecache}
PY=${2:-python3}

if command -v systemd-analyze >/dev/null; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  sed "s|/usr/local/bin/lotecache|$(realpath "$BIN")|" deploy/lotecache.service > "$tmp/lotecache.service"
  systemd-analyze verify "$tmp/lotecache.service"
  echo "deploy/lotecache.service: ok (systemd-analyze verify)"
else
  echo "deploy/lotecache.service: systemd-analyze not available, skipped"
fi

"$PY" - <<'PYEOF'
import yaml
doc = yaml.safe_load(open("deploy/compose.yaml"))
services = doc["services"]
optional = {name for name, s in services.items() if s.get("profiles")}
assert set(services) - optional == {"legacy", "lotecache"}, services
assert optional <= {"prometheus", "grafana"}, optional
for name in optional:
    assert all(str(p).startswith("127.0.0.1:") for p in services[name].get("ports", [])), f"{name} is published beyond loopback"
import json
dash = json.load(open("deploy/grafana/lotecache.json"))
assert dash["uid"] == "lotecache" and dash["panels"], "the dashboard has panels"
assert "ports" not in services["legacy"], "the backend must not be published"
assert any(str(p).endswith("8080:8080") for p in services["lotecache"]["ports"])
assert services["lotecache"]["build"]["dockerfile"] == "deploy/Dockerfile"
print("deploy/compose.yaml: ok (YAML, backend unpublished, lotecache on 8080)")
PYEOF

if command -v promtool >/dev/null; then
  promtool check rules deploy/prometheus/alerts.yml
  promtool check config deploy/prometheus/prometheus.yml
  echo "deploy/prometheus: ok (promtool check rules, check config)"
else
  echo "deploy/prometheus: promtool not available" >&2
  exit 1
fi

NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ -x "$NGINX" ]; then
  tmp2=$(mktemp -d)
  "$NGINX" -t -q -p "$tmp2" -c "$PWD/deploy/nginx-replicas.conf"
  rm -rf "$tmp2"
  echo "deploy/nginx-replicas.conf: ok (nginx -t)"
else
  echo "deploy/nginx-replicas.conf: nginx not available, skipped"
fi

for f in deploy/Dockerfile examples/legacy-backend/Dockerfile; do
  grep -q '^FROM ' "$f" && grep -q '^CMD \[' "$f" || { echo "$f: missing FROM or exec-form CMD" >&2; exit 1; }
  echo "$f: ok (FROM and exec-form CMD present)"
done
