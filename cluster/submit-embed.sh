#!/usr/bin/env bash
# Submit the catalogue embedding job to the local head (cluster/start-head.sh) and follow its logs.
# Store and artifact locations must be absolute: the job runs in a copy of the working directory.
# Usage: cluster/submit-embed.sh [embed flags...], e.g. --catalog "$PWD/data/sample/catalog.parquet"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
source "$here/env.sh"
cd "$root"
"${RAY:-$root/.venv/bin/ray}" job submit --address "$RAY_ADDRESS_HTTP" --working-dir . \
  --runtime-env "$here/runtime_env.yaml" \
  -- "$root/.venv/bin/python" -m vitrine.cli embed \
  --store "${VITRINE_STORE_URI:-$root/var/milvus}" --artifacts "${VITRINE_ARTIFACTS:-$root/var/artifacts}" "$@"
