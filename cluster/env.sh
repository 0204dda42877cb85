# Settings that make a local Ray cluster work on one machine (source this file).
# - Token auth: Ray enables it when ~/.ray/auth_token exists, after which `ray job submit` fails with
#   InvalidAuthToken; on loopback we turn it off explicitly. On a shared network use RAY_AUTH_MODE=token.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# - Keep the node on loopback (Ray otherwise picks the external address even with --node-ip-address). A head that
#   other nodes join (cluster/start-worker.sh, also on this machine) needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 for
#   the head and every worker: Ray refuses to add nodes to a head started with 0.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
export RAY_HEAD_IP="${RAY_HEAD_IP:-127.0.0.1}"
export RAY_GCS_PORT="${RAY_GCS_PORT:-6379}"
export RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
# The job API needs the head's dashboard agent; a second Ray on the machine (an in-process `ray.init()`) holds
# the agent's default port 52365, and then `ray job submit` answers "No available agent". Pick another here.
export RAY_DASHBOARD_AGENT_PORT="${RAY_DASHBOARD_AGENT_PORT:-52365}"
export RAY_ADDRESS_HTTP="http://${RAY_HEAD_IP}:${RAY_DASHBOARD_PORT}"
