#!/usr/bin/env bash
# Stop the throw-away redis started by scripts/redis-start.sh and delete its
# state directory.
#
# Usage: scripts/redis-stop.sh [STATE_DIR]
#   STATE_DIR defaults to $DISKPIPE_REDIS_DIR, then /tmp/diskpipe-redis.
#
# Exits 0 when nothing is running / the directory does not exist. Refuses to
# delete a directory that redis-start.sh did not create (no marker file).
set -euo pipefail

dir="${1:-${DISKPIPE_REDIS_DIR:-/tmp/diskpipe-redis}}"
[[ -e "$dir" ]] || exit 0
dir="$(cd "$dir" && pwd -P)"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ours_or_exit redis "$dir"

pid=""
if [[ -f "$dir/redis.pid" ]]; then
    pid="$(tr -dc '0-9' <"$dir/redis.pid")"
    # Ignore a stale pid file whose pid now belongs to something else.
    if [[ -z "$pid" ]] || [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != redis-server ]]; then
        pid=""
    fi
fi

if [[ -n "$pid" ]]; then
    # Take the address and port from our own config, not from the
    # environment, so we never shut down some other redis.
    port="$(awk '$1 == "port" {print $2}' "$dir/redis.conf" 2>/dev/null || true)"
    addr="$(awk '$1 == "bind" {print $2}' "$dir/redis.conf" 2>/dev/null || true)"
    kill -CONT "$pid" 2>/dev/null || true # in case a test SIGSTOPped it
    # NOSAVE: data is thrown away anyway; skip the final snapshot.
    if [[ -n "$port" ]]; then
        timeout 5 redis-cli -h "${addr:-127.0.0.1}" -p "$port" shutdown nosave >/dev/null 2>&1 || true
    fi
    deadline=$((SECONDS + 10))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        # Fallback if redis-cli could not reach it.
        ((SECONDS < deadline - 5)) || kill -TERM "$pid" 2>/dev/null || true
        sleep 0.1
    done
fi

rm -rf -- "$dir"
