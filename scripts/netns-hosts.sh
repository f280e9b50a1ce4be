#!/usr/bin/env bash
# Several "worker hosts" on this machine, for tests and benchmarks: Linux
# network namespaces joined by veth pairs to a bridge this script creates,
# with Redis and a one-node Ceph bound to bridge addresses (not loopback).
# Traffic only flows between addresses on those interfaces: the namespaces
# have no other interface and no default route, nothing is forwarded.
#
# Usage: scripts/netns-hosts.sh COMMAND [HOST] [-- CMD...]   (as root)
#   up                 build the bridge and hosts h1..hN, start Redis and Ceph
#                      on the bridge; removes leftovers of an earlier run first.
#                      stdout: eval-able lines (DISKPIPE_BROKER_URL, CEPH_CONF,
#                      DISKPIPE_NETNS_HOSTS, DISKPIPE_NETNS_CEPH_DIR...)
#   down               stop every process inside the hosts, stop Redis and Ceph,
#                      remove namespaces, links and rules; idempotent, and also
#                      cleans what a crashed run left behind
#   exec HOST -- CMD   run CMD inside HOST (its own network and hostname)
#   cut HOST           the host's link goes down (its bridge port)
#   restore HOST       its link up again, Redis reachable again
#   cut-redis HOST     Redis unreachable from HOST only (both directions)
#   restore-redis HOST
#   status             what exists now
#
# Environment (give parallel runs their own PREFIX and SUBNET):
#   DISKPIPE_NETNS_PREFIX   names of namespaces/links (default dpn): the
#                           bridge is <prefix>br, host N is <prefix>-hN
#   DISKPIPE_NETNS_SUBNET   a /24 not used on this machine (default
#                           10.213.0.0/24): .1 Ceph, .2 Redis, .11+N host N
#   DISKPIPE_NETNS_HOSTS    number of hosts (default 3, at most 9)
#   DISKPIPE_NETNS_STATE    state dir of Redis and Ceph (default
#                           /tmp/diskpipe-netns-<prefix>)
#   DISKPIPE_NETNS_SERVICES 0: network only, no Redis and Ceph (default 1)
#   DISKPIPE_REDIS_PORT, DISKPIPE_CEPH_PORT, DISKPIPE_CEPH_MEMSTORE_BYTES,
#   DISKPIPE_CEPH_TIMEOUT   passed on to redis-start.sh and ceph-start.sh
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
# Each setting is checked where it is read: the state dir's default is
# built from the prefix. Interface names have at most 15 characters:
# <prefix>-h9 must fit.
prefix="${DISKPIPE_NETNS_PREFIX:-dpn}"
[[ "$prefix" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "DISKPIPE_NETNS_PREFIX must be 1-8 lowercase letters/digits, got '$prefix'"
subnet="${DISKPIPE_NETNS_SUBNET:-10.213.0.0/24}"
[[ "$subnet" =~ ^([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})\.0/24$ ]] || die "DISKPIPE_NETNS_SUBNET must be a /24 like 10.213.0.0/24, got '$subnet'"
net="${BASH_REMATCH[1]}"
count="${DISKPIPE_NETNS_HOSTS:-3}"
[[ "$count" =~ ^[1-9]$ ]] || die "DISKPIPE_NETNS_HOSTS must be 1-9, got '$count'"
state="${DISKPIPE_NETNS_STATE:-/tmp/diskpipe-netns-$prefix}"
[[ "$state" != *[[:space:]]* ]] || die "state dir must not contain whitespace: '$state'"
services="${DISKPIPE_NETNS_SERVICES:-1}"

bridge="${prefix}br"
ceph_ip="$net.1"
redis_ip="$net.2"

host_index() {
    [[ "$1" =~ ^h([1-9])$ ]] && ((BASH_REMATCH[1] <= count)) || die "no host '$1' (hosts: h1..h$count)"
    echo "${BASH_REMATCH[1]}"
}
namespace() { echo "$prefix-$1"; } # also the name of its link on the bridge side
host_ip() { echo "$net.$((10 + $(host_index "$1")))"; }

need_root() {
    command -v ip >/dev/null || die "ip not found (apt-get install iproute2)"
    ((EUID == 0)) || die "must run as root (network namespaces)"
}

# -- down ---------------------------------------------------------------------

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-h[1-9]$" || true; }

alive() { [[ -e "/proc/$1" ]] && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

stop_processes() {
    # Everything running inside our namespaces was started there by us.
    local ns pids=()
    for ns in $(our_namespaces); do
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
    done
    ((${#pids[@]})) || return 0
    log "stopping ${#pids[@]} process(es) inside the hosts"
    kill -CONT "${pids[@]}" 2>/dev/null || true
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local pid deadline=$((SECONDS + 15))
    for pid in "${pids[@]}"; do
        while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    done
}

remove_rules() {
    local rule
    while read -r rule; do
        [[ -n "$rule" ]] && ip rule del ${rule#*:} 2>/dev/null || true
    done < <(ip rule show | grep -F "from $redis_ip to $net." || true)
}

down() {
    need_root
    stop_processes
    if [[ -d "$state" ]]; then
        "$here/ceph-stop.sh" "$state/ceph" || true
        "$here/redis-stop.sh" "$state/redis" || true
        rm -f "$state/ceph.env"
        rmdir "$state" 2>/dev/null || true
    fi
    local ns link
    for ns in $(our_namespaces); do
        ip netns del "$ns" 2>/dev/null || true
    done
    # A namespace still held by a process keeps its end of the veth pair;
    # deleting our end removes both.
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^($prefix-h[1-9]|$bridge)$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    remove_rules
}

# -- up -----------------------------------------------------------------------

# IPv4 only: no link-local IPv6 (router solicitations, DAD) on our links.
no_ipv6() { echo 1 >"/proc/sys/net/ipv6/conf/$1/disable_ipv6"; }

up() {
    need_root
    down # leftovers of a crashed run with the same prefix
    if ip -4 -o addr show | grep -qF " inet $net."; then
        die "$subnet is already used on this machine: $(ip -4 -o addr show | grep -F " inet $net." | head -n 1)"
    fi
    trap 'echo "netns-hosts: up failed, removing what was built" >&2; down' ERR
    trap 'echo "netns-hosts: up interrupted, removing what was built" >&2; down; exit 130' INT TERM

    ip link add "$bridge" type bridge stp_state 0 forward_delay 0
    no_ipv6 "$bridge"
    ip addr add "$ceph_ip/24" dev "$bridge"
    ip addr add "$redis_ip/24" dev "$bridge"
    ip link set "$bridge" up
    local index host ns names=()
    for ((index = 1; index <= count; index++)); do
        host="h$index"
        ns="$(namespace "$host")"
        ip netns add "$ns"
        ip link add "$ns" type veth peer name eth0 netns "$ns"
        no_ipv6 "$ns"
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip link set "$ns" master "$bridge" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$(host_ip "$host")/24" dev eth0
        ip -n "$ns" link set eth0 up
        names+=("$host")
    done
    log "hosts ${names[*]} on $bridge ($subnet): Ceph $ceph_ip, Redis $redis_ip"

    if [[ "$services" == 1 ]]; then
        mkdir -p "$state"
        DISKPIPE_REDIS_ADDR="$redis_ip" "$here/redis-start.sh" "$state/redis"
        # One more try: a busy machine can fail a start that a second passes
        # (ceph-start.sh stops the failed cluster itself).
        DISKPIPE_CEPH_ADDR="$ceph_ip" "$here/ceph-start.sh" "$state/ceph" >"$state/ceph.env" ||
            DISKPIPE_CEPH_ADDR="$ceph_ip" "$here/ceph-start.sh" "$state/ceph" >"$state/ceph.env"
        cat "$state/ceph.env"
        printf 'DISKPIPE_NETNS_CEPH_DIR=%q\n' "$state/ceph"
        printf 'DISKPIPE_NETNS_REDIS_DIR=%q\n' "$state/redis"
    fi
    trap - ERR INT TERM
    printf 'DISKPIPE_NETNS_CEPH_ADDR=%q\nDISKPIPE_NETNS_REDIS_ADDR=%q\n' "$ceph_ip" "$redis_ip"
    printf 'DISKPIPE_NETNS_HOSTS=%q\n' "${names[*]}"
}

# -- faults -------------------------------------------------------------------

exists() { ip netns list | awk '{print $1}' | grep -qx "$(namespace "$1")" || die "host $1 is not up ($(namespace "$1"))"; }

cut_redis() {
    exists "$1"
    local ns ip
    ns="$(namespace "$1")"
    ip="$(host_ip "$1")"
    # Both directions, so neither side gets data the other cannot answer.
    ip -n "$ns" rule add to "$redis_ip/32" unreachable pref 1000 2>/dev/null ||
        ip -n "$ns" rule show | grep -qF "to $redis_ip unreachable"
    ip rule add from "$redis_ip/32" to "$ip/32" unreachable pref 1000 2>/dev/null ||
        ip rule show | grep -qF "from $redis_ip to $ip unreachable"
}

restore_redis() {
    exists "$1"
    local ns ip
    ns="$(namespace "$1")"
    ip="$(host_ip "$1")"
    while ip -n "$ns" rule del to "$redis_ip/32" unreachable pref 1000 2>/dev/null; do :; done
    while ip rule del from "$redis_ip/32" to "$ip/32" unreachable pref 1000 2>/dev/null; do :; done
}

status() {
    local ns
    ip -br addr show dev "$bridge" 2>/dev/null || echo "no bridge $bridge"
    for ns in $(our_namespaces); do
        echo "$ns: link $(ip -br link show dev "$ns" 2>/dev/null | awk '{print $2}'), $(ip netns pids "$ns" | wc -l) process(es)"
    done
    ip rule show | grep -F "from $redis_ip to $net." || true
}

command="${1:-}"
shift || true
case "$command" in
up) up ;;
down) down ;;
status) status ;;
exec)
    host="${1:-}"
    [[ "${2:-}" == -- ]] || die "usage: $0 exec HOST -- CMD..."
    exists "$host"
    shift 2
    # Its own UTS namespace too, so the host name (Celery's %h, the job
    # record's owner, temporary image names) tells the hosts apart.
    exec ip netns exec "$(namespace "$host")" unshare --uts -- \
        sh -c 'hostname "$0" && exec "$@"' "$(namespace "$host")" "$@"
    ;;
cut)
    exists "${1:-}"
    ip link set "$(namespace "$1")" down
    ;;
restore)
    exists "${1:-}"
    ip link set "$(namespace "$1")" up
    restore_redis "$1"
    ;;
cut-redis) cut_redis "${1:-}" ;;
restore-redis) restore_redis "${1:-}" ;;
*) die "usage: $0 up|down|status|exec HOST -- CMD|cut HOST|restore HOST|cut-redis HOST|restore-redis HOST" ;;
esac
