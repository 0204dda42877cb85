#!/usr/bin/env bash
# Start a local Ray head on loopback (with the dashboard, which serves the job API for `ray job submit`).
# Usage: cluster/start-head.sh [--num-cpus N]
# (RAY_GCS_PORT, RAY_DASHBOARD_PORT, RAY_DASHBOARD_AGENT_PORT and RAY_TEMP_DIR override the defaults)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
RAY="${RAY:-$here/../.venv/bin/ray}"
extra=()
[ -n "${RAY_TEMP_DIR:-}" ] && extra+=(--temp-dir "$RAY_TEMP_DIR")
exec "$RAY" start --head --node-ip-address "$RAY_HEAD_IP" --port "$RAY_GCS_PORT" \
  --dashboard-host "$RAY_HEAD_IP" --dashboard-port "$RAY_DASHBOARD_PORT" --include-dashboard true \
  --dashboard-agent-listen-port "$RAY_DASHBOARD_AGENT_PORT" \
  --disable-usage-stats "${extra[@]}" "$@"

