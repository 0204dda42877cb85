#!/usr/bin/env bash
# Stop the Ray processes started on this machine by cluster/start-head.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
"${RAY:-$here/../.venv/bin/ray}" stop
