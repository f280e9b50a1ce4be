# shellcheck shell=bash
# What the scripts that start and stop the throw-away services (Redis, Ceph,
# its gateway, the network namespaces) share.
# Sourced by them, never run.

# log / die MESSAGE: to stderr, after the name of the script that was run
# ("ceph-start: ..."); die says ERROR and exits 1.
script_name="$(basename "${BASH_SOURCE[-1]}" .sh)"
log() { echo "$script_name: $*" >&2; }
die() {
    echo "$script_name: ERROR: $*" >&2
    exit 1
}

# Alive = /proc entry exists and it is not a fully-exited zombie. After
# SIGKILL the thread-group leader turns Z at once while the other threads still
# tear down (releasing GiBs of memstore RAM, closing the listening sockets), so
# Z only counts as dead once the leader is its last thread. A real zombie
# (pid 1 of a container may never reap) must not make us wait forever.
alive() {
    local state ntasks
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" ]] || return 1
    [[ "$state" != Z ]] && return 0
    ntasks="$(find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    ((ntasks > 1))
}

# fresh_state_dir NAME DIR PORT WHY [ADDR]: make the state directory DIR of a new
# NAME (redis, ceph) ours and empty. What an earlier NAME-start.sh left there
# is stopped and wiped by NAME-stop.sh, which refuses a directory without the
# marker, so a typo cannot rm -rf $HOME; a foreign non-empty DIR is refused.
# So is a PORT already in use on ADDR (default 127.0.0.1; WHY says what may
# hold it): the instance holding it would answer in place of ours.
fresh_state_dir() {
    local name="$1" dir="$2" port="$3" why="$4" addr="${5:-127.0.0.1}"
    if [[ -e "$dir/.diskpipe-$name" ]]; then
        echo "$name-start: stopping the previous $name in $dir" >&2
        "$(dirname "${BASH_SOURCE[0]}")/$name-stop.sh" "$dir"
        mkdir -p "$dir"
    elif [[ -n "$(ls -A "$dir")" ]]; then
        die "$dir exists, is not empty and was not created by this script"
    fi
    if (exec 3<>"/dev/tcp/$addr/$port") 2>/dev/null; then
        rmdir "$dir" 2>/dev/null || true # do not leave an empty dir behind
        die "$addr:$port is already in use ($why)"
    fi
    touch "$dir/.diskpipe-$name"
}

# ours_or_exit NAME DIR: exit 1, touching nothing, unless DIR is empty or
# carries the marker of NAME-start.sh.
ours_or_exit() {
    local name="$1" dir="$2"
    if [[ ! -e "$dir/.diskpipe-$name" ]] && [[ -n "$(ls -A "$dir")" ]]; then
        echo "$name-stop: $dir was not created by $name-start.sh (no marker); not touching it" >&2
        exit 1
    fi
}
