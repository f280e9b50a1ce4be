#!/usr/bin/env bash
# Stop the throw-away Ceph cluster started by scripts/ceph-start.sh and delete
# its state directory.
#
# Usage: scripts/ceph-stop.sh [STATE_DIR]
#   STATE_DIR defaults to $DISKPIPE_CEPH_DIR, then /tmp/diskpipe-ceph.
#
# Exits 0 when nothing is running / the directory does not exist. Refuses to
# delete a directory that ceph-start.sh did not create (no marker file).
set -euo pipefail

dir="${1:-${DISKPIPE_CEPH_DIR:-/tmp/diskpipe-ceph}}"
[[ -e "$dir" ]] || exit 0
dir="$(cd "$dir" && pwd -P)"
conf="$dir/ceph.conf"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ours_or_exit ceph "$dir"

# A gateway first, and alone: killed together with its OSD it can hang in
# shutdown for minutes.
"$(dirname "${BASH_SOURCE[0]}")/rgw-stop.sh" "$dir"

# Our daemons: pids from the pid files, plus any ceph-mon/ceph-osd whose
# command line names our ceph.conf (covers a start that died before the
# daemon wrote its pid file).
pids=()
for pf in "$dir"/run/*.pid; do
    [[ -f "$pf" ]] || continue
    pid="$(tr -dc '0-9' <"$pf")"
    [[ -n "$pid" ]] || continue
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    # Only kill it if the pid still belongs to a ceph daemon (pid reuse).
    if [[ "$comm" == ceph-mon || "$comm" == ceph-osd ]]; then
        pids+=("$pid")
    fi
done
for p in /proc/[0-9]*; do
    comm="$(cat "$p/comm" 2>/dev/null || true)"
    [[ "$comm" == ceph-mon || "$comm" == ceph-osd ]] || continue
    if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF -- "$conf"; then
        pids+=("${p#/proc/}")
    fi
done

if ((${#pids[@]})); then
    # Deduplicate.
    mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
    for pid in "${pids[@]}"; do
        comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
        if [[ "$comm" == ceph-osd ]]; then
            # SIGKILL on purpose: on a clean shutdown memstore dumps every
            # object it holds to the data dir (GiBs of disk writes for data
            # we are about to delete). SIGKILL also works on a SIGSTOPped OSD.
            kill -KILL "$pid" 2>/dev/null || true
        else
            # CONT first so a SIGSTOPped mon can act on TERM.
            kill -CONT "$pid" 2>/dev/null || true
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    deadline=$((SECONDS + 15))
    for pid in "${pids[@]}"; do
        while alive "$pid"; do
            if ((SECONDS >= deadline)); then
                kill -KILL "$pid" 2>/dev/null || true
                sleep 0.5
                alive "$pid" && echo "ceph-stop: pid $pid did not exit" >&2
                break
            fi
            sleep 0.2
        done
    done
fi

rm -rf -- "$dir"
