#!/usr/bin/env bash
# The whole distributed setup on one machine: Redis (append-only) as broker
# and record store, a one-node Ceph with a cephx user for diskpipe, N Celery
# workers storing into RBD, then one import through the broker.
#
#   bash scripts/cluster.sh up [--workers N] [--concurrency C] [--dir DIR] [--no-setup] [--no-import]
#   bash scripts/cluster.sh status [--dir DIR]   # exit 0 all running, 1 a part is down, 3 no cluster
#   bash scripts/cluster.sh env [--dir DIR]      # export lines for eval: DISKPIPE_CONFIG, DISKPIPE_BROKER_URL, CEPH_CONF
#   bash scripts/cluster.sh down [--dir DIR]     # idempotent; removes the state dir
#
# up: installs what is missing (scripts/setup.sh; --no-setup skips it),
# starts Redis (scripts/redis-start.sh) and Ceph (scripts/ceph-start.sh,
# cephx on), writes the workers' diskpipe.toml, starts N workers
# (`celery -A diskpipe.tasks worker`, default 2, each with C processes,
# default 1), detached in their own sessions with pid files and logs, waits
# until each answers a ping, then makes a sample qcow2 and imports it with
# `diskpipe import --broker` (which waits for the job) and shows the RBD
# image. A failed step leaves everything as it is for a look at the logs;
# `down` cleans up.
#
# The state dir holds it all:
#   diskpipe.toml, env            the workers' configuration; its environment (NAME=value lines)
#   redis/, ceph/                 the two services' own state dirs (conf, logs, keyrings)
#   workers/wN.pid, workers/wN.log
#   imports/                      [import] allowed_dirs: the only local paths a job may read
#   staging/                      [import] staging_dir
#
# Environment:
#   DISKPIPE_CLUSTER_DIR           state dir (default ${XDG_RUNTIME_DIR:-/tmp}/diskpipe-cluster); --dir wins
#   DISKPIPE_REDIS_PORT            Redis port on 127.0.0.1 (default 6379)
#   DISKPIPE_CEPH_PORT             Ceph monitor port on 127.0.0.1 (default 6789)
#   DISKPIPE_CEPH_MEMSTORE_BYTES   the OSD's capacity, held in RAM (default 4 GiB, see ceph-start.sh)
#   DISKPIPE_CLUSTER_TIMEOUT       seconds each step may take: Ceph, workers, the import (default 300)
#   DISKPIPE_CLUSTER_STOP_TIMEOUT  seconds `down` lets workers finish running jobs before SIGKILL (default 60)
set -Eeuo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
scripts="$root/scripts"
venv="$root/.venv"
timeout_s="${DISKPIPE_CLUSTER_TIMEOUT:-300}"
stop_timeout_s="${DISKPIPE_CLUSTER_STOP_TIMEOUT:-60}"
pool="rbd"
ceph_user="diskpipe"
sample_recipe="qcow2-v3-c64k"

usage() {
    sed -n '6,9p' "${BASH_SOURCE[0]}" | sed 's/^#   //' >&2
    exit 2
}
cleanup_hint=""
die() {
    echo "cluster: ERROR: $*$cleanup_hint" >&2
    exit 1
}
say() { echo "cluster: $*"; }

now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f s", end - start }'; }

# -- arguments -------------------------------------------------------------

[[ $# -ge 1 ]] || usage
command="$1"
shift
dir="${DISKPIPE_CLUSTER_DIR:-${XDG_RUNTIME_DIR:-/tmp}/diskpipe-cluster}"
workers=2
concurrency=1
with_setup=1
with_import=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) dir="${2:?--dir needs a directory}"; shift ;;
        --workers) workers="${2:?--workers needs a number}"; shift ;;
        --concurrency) concurrency="${2:?--concurrency needs a number}"; shift ;;
        --no-setup) with_setup=0 ;;
        --no-import) with_import=0 ;;
        *) usage ;;
    esac
    shift
done
[[ "$workers" =~ ^[1-9][0-9]?$ ]] || die "--workers must be 1-99, got '$workers'"
[[ "$concurrency" =~ ^[1-9][0-9]?$ ]] || die "--concurrency must be 1-99, got '$concurrency'"
[[ "$timeout_s" =~ ^[0-9]+$ && "$stop_timeout_s" =~ ^[0-9]+$ ]] || die "the timeouts must be whole seconds"
[[ "$dir" != *[[:space:]]* ]] || die "the state dir must not contain whitespace: '$dir'"
dir="$(realpath -m -- "$dir")"
marker="$dir/.diskpipe-cluster"

# The workers and the job commands get this cluster's settings and none of
# the caller's DISKPIPE_* overrides (a DISKPIPE_BROKER_URL in the shell would
# otherwise send the workers to another broker).
clean_env=(env)
while IFS= read -r name; do
    clean_env+=(-u "$name")
done < <(compgen -e | grep '^DISKPIPE_' || true)

with_cluster_env() {
    "${clean_env[@]}" DISKPIPE_CONFIG="$dir/diskpipe.toml" CEPH_CONF="$dir/ceph/ceph.conf" "$@"
}

# -- workers ---------------------------------------------------------------

# A pid file's process is ours only while its command line names our log
# (pid files outlive their processes; pids are reused).
worker_pid() {
    local file="$1" pid
    [[ -f "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" ]] || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qxF -- "$dir/workers/$(basename "$file" .pid).log" || return 1
    echo "$pid"
}

worker_names() {
    local file
    for file in "$dir"/workers/w*.pid; do
        [[ -e "$file" ]] && basename "$file" .pid
    done
    return 0
}

start_worker() {
    local name="$1"
    # Its own session, so `down` can signal the main process and its pool
    # children together. A simple command, not a function: `&` then forks
    # once and env, setsid (no group leader: no fork) and celery exec in
    # turn, so $! is the worker's main process.
    "${clean_env[@]}" DISKPIPE_CONFIG="$dir/diskpipe.toml" CEPH_CONF="$dir/ceph/ceph.conf" \
        setsid "$venv/bin/celery" -A diskpipe.tasks worker \
        --hostname "cluster-$name@%h" --loglevel INFO --without-mingle --without-gossip \
        --logfile "$dir/workers/$name.log" \
        </dev/null >>"$dir/workers/$name.log" 2>&1 &
    echo "$!" >"$dir/workers/$name.pid"
}

# Prints the names (w1 ...) of the workers that answered a ping.
pinging_workers() {
    with_cluster_env timeout 60 "$venv/bin/celery" -A diskpipe.tasks inspect ping --timeout 5 2>/dev/null |
        sed -n 's/^->  *cluster-\(w[0-9]*\)@.*OK.*/\1/p' || true
}

wait_for_workers() {
    local deadline=$((SECONDS + timeout_s)) name missing answered
    while :; do
        missing=()
        for name in $(worker_names); do
            worker_pid "$dir/workers/$name.pid" >/dev/null ||
                die "worker $name exited while starting; tail of $dir/workers/$name.log:
$(tail -n 20 "$dir/workers/$name.log")"
            grep -q ' ready\.' "$dir/workers/$name.log" || missing+=("$name")
        done
        if [[ ${#missing[@]} -eq 0 ]]; then
            answered="$(pinging_workers)"
            missing=()
            for name in $(worker_names); do
                grep -qx "$name" <<<"$answered" || missing+=("$name")
            done
            [[ ${#missing[@]} -gt 0 ]] || return 0
        fi
        ((SECONDS < deadline)) || die "workers ${missing[*]} not ready after ${timeout_s}s (logs in $dir/workers)"
        sleep 1
    done
}

# Warm shutdown first (SIGTERM: a worker stops taking jobs and finishes the
# running ones), then SIGKILL to each worker's whole session. A job killed
# here was never acknowledged, so Redis hands it out again.
stop_workers() {
    local name pid deadline groups=()
    for name in $(worker_names); do
        if pid="$(worker_pid "$dir/workers/$name.pid")"; then
            kill -TERM "$pid" 2>/dev/null || true
            groups+=("$pid")
        fi
    done
    [[ ${#groups[@]} -gt 0 ]] || return 0
    deadline=$((SECONDS + stop_timeout_s))
    for pid in "${groups[@]}"; do
        while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.5
        done
        if kill -0 -- "-$pid" 2>/dev/null; then
            echo "cluster: worker $pid still running after ${stop_timeout_s}s: SIGKILL" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    done
    for pid in "${groups[@]}"; do
        deadline=$((SECONDS + 30))
        while kill -0 -- "-$pid" 2>/dev/null; do
            ((SECONDS < deadline)) || { echo "cluster: worker group $pid did not exit" >&2; break; }
            sleep 0.2
        done
    done
}

# -- up --------------------------------------------------------------------

write_config() {
    local broker="$1" keyring="$2"
    cat >"$dir/diskpipe.toml" <<EOF
# Written by scripts/cluster.sh for its workers; a worker host's full
# configuration, with every key explained: docs/examples/worker.toml.
[store]
kind = "rbd"

[rbd]
pool = "$pool"
user = "$ceph_user"
conf = "$dir/ceph/ceph.conf"
keyring = "$keyring"

[celery]
broker_url = "$broker"
concurrency = $concurrency

[import]
allowed_dirs = ["$dir/imports"]
staging_dir = "$dir/staging"
EOF
    cat >"$dir/env" <<EOF
DISKPIPE_CONFIG=$dir/diskpipe.toml
DISKPIPE_BROKER_URL=$broker
CEPH_CONF=$dir/ceph/ceph.conf
EOF
}

broker_url() { sed -n 's/^DISKPIPE_BROKER_URL=//p' "$dir/env"; }

# Fields of the JSON object on stdin, in a str.format template; {url} is the
# first location's.
json_fields() {
    "$venv/bin/python" -c 'import json, sys
d = json.load(sys.stdin)
d["url"] = (d.get("locations") or [{}])[0].get("url")
print(sys.argv[1].format_map(d))' "$1"
}

import_sample() {
    local started image_id record
    started="$(now)"
    # `samples` is a checkout tool (not installed): run from the checkout.
    (cd "$root" && "$venv/bin/python" -m samples "$dir/samples" --only "$sample_recipe") >>"$dir/up.log" 2>&1
    mv "$dir/samples/qcow2/$sample_recipe.qcow2" "$dir/imports/sample.qcow2"
    rm -rf "$dir/samples"
    say "sample: $dir/imports/sample.qcow2, $(with_cluster_env "$venv/bin/diskpipe" info --output json \
        "$dir/imports/sample.qcow2" | json_fields '{format} of {virtual-size} bytes virtual') ($(since "$started"))"

    image_id="cluster-sample-$(date +%s)"
    say "importing it through the broker: diskpipe import --broker $(broker_url) --claimed-format qcow2 --id $image_id ..."
    started="$(now)"
    if ! record="$(with_cluster_env timeout "$timeout_s" "$venv/bin/diskpipe" import "$dir/imports/sample.qcow2" \
        --broker "$(broker_url)" --claimed-format qcow2 \
        --id "$image_id" --name sample --quiet --output json)"; then
        echo "$record" >&2
        die "the import did not end active (worker logs: $dir/workers)"
    fi
    say "import $image_id: $(json_fields '{status}, {disk_format} of {virtual_size} bytes, sha512 {os_hash_value:.16}..., at {url}' <<<"$record") ($(since "$started"))"
    say "in RBD (rbd ls -l $pool):"
    with_cluster_env rbd --conf "$dir/ceph/ceph.conf" ls -l "$pool" | sed 's/^/  /'
}

cmd_up() {
    local t0 started redis_out ceph_out broker keyring name
    t0="$(now)"
    if [[ -e "$dir" ]]; then
        [[ -e "$marker" ]] && die "a cluster already lives in $dir: 'scripts/cluster.sh status' or 'down' first"
        [[ -z "$(ls -A "$dir")" ]] || die "$dir exists and is not a cluster's state dir"
    fi
    if ((with_setup)); then
        started="$(now)"
        bash "$scripts/setup.sh"
        say "setup: $(since "$started")"
    fi
    [[ -x "$venv/bin/celery" ]] || die "$venv has no celery: run scripts/setup.sh first"

    mkdir -p -m 700 "$dir"
    touch "$marker"
    cleanup_hint="
cluster: what started is left running for a look at the logs in $dir; 'bash scripts/cluster.sh down --dir $dir' stops it"
    mkdir -p "$dir/workers" "$dir/imports" "$dir/staging"

    started="$(now)"
    redis_out="$(DISKPIPE_REDIS_PORT="${DISKPIPE_REDIS_PORT:-6379}" bash "$scripts/redis-start.sh" "$dir/redis" 2>>"$dir/up.log")" ||
        die "Redis did not start: $(tail -n 5 "$dir/up.log")"
    broker="$(sed -n 's/^DISKPIPE_BROKER_URL=//p' <<<"$redis_out")"
    say "redis: $broker, append-only ($(since "$started"))"

    started="$(now)"
    ceph_out="$(DISKPIPE_CEPH_CEPHX=1 DISKPIPE_CEPH_POOL="$pool" DISKPIPE_CEPH_PORT="${DISKPIPE_CEPH_PORT:-6789}" \
        DISKPIPE_CEPH_TIMEOUT="$timeout_s" bash "$scripts/ceph-start.sh" "$dir/ceph" 2>>"$dir/up.log")" ||
        die "Ceph did not start: $(tail -n 20 "$dir/up.log")"
    keyring="$(sed -n 's/^DISKPIPE_CEPH_KEYRING=//p' <<<"$ceph_out")"
    say "ceph: mon 127.0.0.1:${DISKPIPE_CEPH_PORT:-6789}, pool $pool, cephx user client.$ceph_user ($(since "$started"))"

    write_config "$broker" "$keyring"
    started="$(now)"
    for ((i = 1; i <= workers; i++)); do
        start_worker "w$i"
    done
    wait_for_workers
    for name in $(worker_names); do
        say "worker cluster-$name@$(hostname): pid $(cat "$dir/workers/$name.pid"), $concurrency process(es), log $dir/workers/$name.log"
    done
    say "$workers worker(s) answering ($(since "$started"))"

    ((with_import)) && import_sample
    say "up in $(since "$t0"); state in $dir"
    say "next: eval \"\$(bash scripts/cluster.sh env)\"; .venv/bin/diskpipe list; bash scripts/cluster.sh status; bash scripts/cluster.sh down"
}

# -- status, env, down -----------------------------------------------------

cmd_status() {
    local problems=0 pid port health name answered
    if [[ ! -e "$marker" ]]; then
        echo "no cluster in $dir"
        exit 3
    fi
    port="$(awk '$1 == "port" {print $2}' "$dir/redis/redis.conf" 2>/dev/null || true)"
    if [[ -n "$port" && "$(timeout 5 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]]; then
        echo "redis    up    127.0.0.1:$port (pid $(cat "$dir/redis/redis.pid" 2>/dev/null))"
    else
        echo "redis    DOWN  ${port:+127.0.0.1:$port}"
        problems=1
    fi
    if health="$(timeout 20 ceph --conf "$dir/ceph/ceph.conf" --connect-timeout 10 health 2>/dev/null)"; then
        echo "ceph     up    $health"
    else
        echo "ceph     DOWN  (no answer from the monitor)"
        problems=1
    fi
    answered="$( ((problems)) || pinging_workers)"
    for name in $(worker_names); do
        if ! pid="$(worker_pid "$dir/workers/$name.pid")"; then
            echo "worker   DOWN  cluster-$name (log $dir/workers/$name.log)"
            problems=1
        elif grep -qx "$name" <<<"$answered"; then
            echo "worker   up    cluster-$name (pid $pid)"
        else
            echo "worker   MUTE  cluster-$name (pid $pid runs but does not answer a ping)"
            problems=1
        fi
    done
    if ((problems == 0)); then
        echo "images:"
        with_cluster_env "$venv/bin/diskpipe" list --broker "$(broker_url)" | sed 's/^/  /'
    fi
    return "$problems"
}

# `export` lines: a bare NAME=value from eval would stay a shell variable
# that diskpipe never sees (and it would quietly run in process).
cmd_env() {
    [[ -e "$marker" ]] || die "no cluster in $dir"
    local name value
    while IFS='=' read -r name value; do
        printf 'export %s=%q\n' "$name" "$value"
    done <"$dir/env"
}

cmd_down() {
    if [[ ! -e "$dir" ]]; then
        say "nothing to stop in $dir"
        return 0
    fi
    if [[ ! -e "$marker" && -n "$(ls -A "$dir")" ]]; then
        die "$dir was not made by scripts/cluster.sh (no $marker); not touching it"
    fi
    local started
    started="$(now)"
    [[ -d "$dir/workers" ]] && stop_workers
    [[ -d "$dir/ceph" ]] && bash "$scripts/ceph-stop.sh" "$dir/ceph"
    [[ -d "$dir/redis" ]] && bash "$scripts/redis-stop.sh" "$dir/redis"
    rm -rf -- "$dir"
    say "down in $(since "$started"): workers, Ceph and Redis stopped, $dir removed"
}

case "$command" in
    up) cmd_up ;;
    status) cmd_status ;;
    env) cmd_env ;;
    down) cmd_down ;;
    *) usage ;;
esac
