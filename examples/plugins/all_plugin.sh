#!/usr/bin/env bash
# Runs in every process (scheduler and each worker): says who it serves, then a line every few
# seconds, and exits 0 on SIGTERM/SIGINT. Shows how a shell plugin checks its environment and stops
# at once: `sleep` runs in the background and the shell waits for it, because bash runs a trap only
# between commands and `wait` is the one command a signal interrupts.
set -u

: "${LMCACHE_PLUGIN_ROLE:?not set}" "${LMCACHE_PLUGIN_WORKER_COUNT:?not set}"
worker_id="${LMCACHE_PLUGIN_WORKER_ID:--1}"
if ! [[ $worker_id =~ ^-?[0-9]+$ && $LMCACHE_PLUGIN_WORKER_COUNT =~ ^[0-9]+$ ]]; then
    echo "all_plugin: LMCACHE_PLUGIN_WORKER_ID/WORKER_COUNT must be integers" >&2
    exit 2
fi

# A number from the JSON config without jq: extra_config.all_plugin_interval, default 5 seconds.
interval=5
if [[ ${LMCACHE_PLUGIN_CONFIG:-} =~ \"all_plugin_interval\"[[:space:]]*:[[:space:]]*([0-9]+(\.[0-9]+)?) ]]; then
    interval="${BASH_REMATCH[1]}"
fi

sleeper=""
stop() {
    echo "all_plugin stopping"
    [[ -n $sleeper ]] && kill "$sleeper" 2>/dev/null
    exit 0
}
trap stop TERM INT

echo "all_plugin started: role=${LMCACHE_PLUGIN_ROLE} worker_id=${worker_id}" \
    "worker_count=${LMCACHE_PLUGIN_WORKER_COUNT}"
while true; do
    sleep "$interval" &
    sleeper=$!
    wait "$sleeper"
    echo "all_plugin alive: role=${LMCACHE_PLUGIN_ROLE} worker_id=${worker_id}"
done
