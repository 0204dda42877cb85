#!/usr/bin/env bash
# Join a worker node to the head started by cluster/start-head.sh. On one machine (a local "multi-node" cluster)
# each extra node needs its own ports and temp dir: set NODE=1, 2, ... and the ports are derived from it.
# (RAY_WORKER_PORT_BASE overrides the derived port range.)
# Usage: NODE=1 cluster/start-worker.sh [--num-cpus N] [--resources '{"worker": 1}'] [--block]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
RAY="${RAY:-$here/../.venv/bin/ray}"
node="${NODE:-1}"
base="${RAY_WORKER_PORT_BASE:-$((20000 + node * 100))}"
extra=()
[ -n "${RAY_TEMP_DIR:-}" ] && extra+=(--temp-dir "$RAY_TEMP_DIR")
exec "$RAY" start --address "$RAY_HEAD_IP:$RAY_GCS_PORT" --node-ip-address "$RAY_HEAD_IP" \
  --node-manager-port "$((base + 1))" --object-manager-port "$((base + 2))" \
  --dashboard-agent-listen-port "$((base + 3))" --dashboard-agent-grpc-port "$((base + 4))" \
  --metrics-export-port "$((base + 5))" --runtime-env-agent-port "$((base + 6))" \
  --min-worker-port "$((base + 10))" --max-worker-port "$((base + 99))" \
  --disable-usage-stats "${extra[@]}" "$@"
