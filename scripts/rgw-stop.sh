#!/usr/bin/env bash
# Stop the RADOS Gateway that scripts/rgw-start.sh started in STATE_DIR (the
# cluster keeps running). scripts/ceph-stop.sh calls it first: a gateway
# killed together with its OSD can hang in shutdown for minutes.
#
# Usage: scripts/rgw-stop.sh STATE_DIR
set -euo pipefail

dir="${1:?usage: rgw-stop.sh STATE_DIR}"
[[ -d "$dir" ]] || exit 0
pidfile="$dir/run/client.rgw.diskpipe.pid"
[[ -f "$pidfile" ]] || exit 0
pid="$(tr -dc '0-9' <"$pidfile")"
# Only a radosgw (pid reuse), and only ours.
if [[ -z "$pid" || "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != radosgw ]]; then
    rm -f "$pidfile"
    exit 0
fi
kill -TERM "$pid" 2>/dev/null || true
deadline=$((SECONDS + 10))
while [[ -e "/proc/$pid" && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; do
    if ((SECONDS >= deadline)); then
        kill -KILL "$pid" 2>/dev/null || true
        break
    fi
    sleep 0.1
done
# The pid file goes only after the process: a restart must not race a dying gateway for the port.
while [[ -e "/proc/$pid" && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; do sleep 0.1; done
rm -f "$pidfile"
