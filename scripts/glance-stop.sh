#!/usr/bin/env bash
# Stop the throw-away Glance started by scripts/glance-start.sh (and whatever
# it still runs, e.g. a qemu-img conversion) and delete its state directory.
# Glance's virtualenv is kept for the next start.
#
# Usage: scripts/glance-stop.sh [STATE_DIR]
#   STATE_DIR defaults to $DISKPIPE_GLANCE_DIR, then /tmp/diskpipe-glance.
#
# Exits 0 when nothing is running / the directory does not exist. Refuses to
# delete a directory that glance-start.sh did not create (no marker file).
set -euo pipefail

dir="${1:-${DISKPIPE_GLANCE_DIR:-/tmp/diskpipe-glance}}"
[[ -e "$dir" ]] || exit 0
dir="$(cd "$dir" && pwd -P)"

if [[ ! -e "$dir/.diskpipe-glance" ]] && [[ -n "$(ls -A "$dir")" ]]; then
    echo "glance-stop: $dir was not created by glance-start.sh (no marker); not touching it" >&2
    exit 1
fi

alive() { [[ -e "/proc/$1" ]] && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

pid=""
if [[ -f "$dir/glance.pid" ]]; then
    pid="$(tr -dc '0-9' <"$dir/glance.pid")"
    # Only our gunicorn: a stale pid file's number may belong to anything now.
    if [[ -z "$pid" ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "gunicorn.*glance.wsgi.api"; then
        pid=""
    fi
fi

if [[ -n "$pid" ]]; then
    # gunicorn was started with setsid: its pid is its process group.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            kill -KILL -- "-$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    # Anything of that group still running (a qemu-img mid-conversion).
    kill -KILL -- "-$pid" 2>/dev/null || true
fi

rm -rf -- "$dir"
