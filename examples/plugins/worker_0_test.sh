#!/usr/bin/env bash
# Runs only in worker 0 (a worker ID is read from names of three or more parts: worker_0.sh, with
# two parts, would run in every worker). Same shape as all_plugin.sh: say who, loop, stop on TERM.
set -u

: "${LMCACHE_PLUGIN_WORKER_ID:?not set}"

sleeper=""
stop() {
    echo "worker_0_test stopping"
    [[ -n $sleeper ]] && kill "$sleeper" 2>/dev/null
    exit 0
}
trap stop TERM INT

echo "worker_0_test started: worker_id=${LMCACHE_PLUGIN_WORKER_ID}"
while true; do
    sleep 5 &
    sleeper=$!
    wait "$sleeper"
    echo "worker_0_test alive"
done
