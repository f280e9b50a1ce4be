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

if [[ ! -e "$dir/.diskpipe-redis" ]] && [[ -n "$(ls -A "$dir")" ]]; then
    echo "redis-stop: $dir was not created by redis-start.sh (no marker); not touching it" >&2
    exit 1
fi

# Alive = /proc entry exists and it is not a fully-exited zombie. The leader
# of a multi-threaded process turns Z before its other threads (which may still
# hold the port) are gone; a real zombie (pid 1 of a container may be slow to
# reap) must not make us wait.
alive() {
    local state ntasks
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" ]] || return 1
    [[ "$state" != Z ]] && return 0
    ntasks="$(find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    ((ntasks > 1))
}

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
