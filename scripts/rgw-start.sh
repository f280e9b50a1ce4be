#!/usr/bin/env bash
# Start a RADOS Gateway (S3) on a cluster made by scripts/ceph-start.sh, wait
# until it answers, and make sure a test user exists. Running it again on the
# same state dir restarts a stopped gateway (the user and buckets survive).
# `scripts/ceph-start.sh --rgw` calls it; the tests call it to restart the
# gateway after stopping it on purpose.
#
# Usage: scripts/rgw-start.sh STATE_DIR
#
# Environment:
#   DISKPIPE_RGW_PORT        HTTP port on 127.0.0.1 (default 7481)
#   DISKPIPE_RGW_ACCESS_KEY  the test user's keys (default diskpipe-test /
#   DISKPIPE_RGW_SECRET_KEY  diskpipe-test-secret)
#   DISKPIPE_RGW_TIMEOUT     seconds to wait for the gateway (default 120)
#
# stdout: eval-able lines DISKPIPE_S3_ENDPOINT=..., DISKPIPE_S3_ACCESS_KEY=...,
# DISKPIPE_S3_SECRET_KEY=... Progress goes to stderr.
#
# Facts behind the settings (see the README's "S3 store" section): with auth
# none radosgw still asks for a *secure* mon connection and hangs 300 s
# unless ms_mon_client_mode = crc; it creates 7 pools, so the pools' default
# PG count is lowered first (mon_max_pg_per_osd is 250 on one OSD); deleted
# objects' data waits rgw_gc_obj_min_wait (2 h) before it is freed, too long
# for a RAM-backed OSD.
set -Eeuo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dir="${1:?usage: rgw-start.sh STATE_DIR}"
port="${DISKPIPE_RGW_PORT:-7481}"
access_key="${DISKPIPE_RGW_ACCESS_KEY:-diskpipe-test}"
secret_key="${DISKPIPE_RGW_SECRET_KEY:-diskpipe-test-secret}"
timeout_s="${DISKPIPE_RGW_TIMEOUT:-120}"
name=client.rgw.diskpipe

trap 'echo "rgw-start: ERROR: line $LINENO: $BASH_COMMAND failed (see $dir/log/rgw-setup.log)" >&2' ERR

[[ "$port" =~ ^[0-9]+$ ]] || die "DISKPIPE_RGW_PORT must be a number, got '$port'"
command -v radosgw >/dev/null || die "radosgw not found (apt-get install radosgw)"
dir="$(cd "$dir" && pwd -P)"
conf="$dir/ceph.conf"
[[ -e "$dir/.diskpipe-ceph" && -f "$conf" ]] || die "$dir is not a cluster made by ceph-start.sh"
mkdir -p "$dir/log" "$dir/run"
setup_log="$dir/log/rgw-setup.log"
pidfile="$dir/run/$name.pid"
endpoint="http://127.0.0.1:$port"

answers() { curl -s -o /dev/null --max-time 2 "$endpoint/"; }

running=0
if [[ -f "$pidfile" ]]; then
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == radosgw ]] && running=1
fi

if ((running == 0)); then
    if answers; then
        die "127.0.0.1:$port is already in use (another gateway? set DISKPIPE_RGW_PORT)"
    fi
    if ! grep -qF "[$name]" "$conf"; then
        # Before the gateway's first start: its pools take this default.
        # Retried until the deadline: on a busy machine (or a cluster just
        # rebuilt) a command can reach the mon before its monmap is there and
        # be refused (EPERM); both settings are idempotent.
        for option in osd_pool_default_pg_num osd_pool_default_pgp_num; do
            config_deadline=$((SECONDS + timeout_s))
            until ceph -c "$conf" --connect-timeout 10 config set global "$option" 8 >>"$setup_log" 2>&1; do
                ((SECONDS < config_deadline)) || die "ceph config set $option failed, see $setup_log"
                sleep 1
            done
        done
        mkdir -p "$dir/rgw"
        cat >>"$conf" <<EOF

[$name]
ms_mon_client_mode = crc
rgw_frontends = beast endpoint=127.0.0.1:$port
rgw_data = $dir/rgw
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
pid_file = $pidfile
rgw_gc_obj_min_wait = 30
rgw_gc_processor_period = 30
EOF
    fi
    log "starting radosgw on $endpoint"
    # It daemonizes once it has the cluster's config; a misconfiguration
    # would otherwise hang here for 300 s.
    timeout "$timeout_s" radosgw -c "$conf" -n "$name" >>"$setup_log" 2>&1 ||
        die "radosgw did not start, see $setup_log and $dir/log/$name.log"
fi

deadline=$((SECONDS + timeout_s))
until answers; do
    ((SECONDS < deadline)) || die "radosgw did not answer on $endpoint within ${timeout_s}s (see $dir/log/$name.log)"
    sleep 0.25
done

if ! radosgw-admin -c "$conf" user info --uid diskpipe-test >/dev/null 2>&1; then
    radosgw-admin -c "$conf" user create --uid diskpipe-test --display-name "diskpipe tests" \
        --access-key "$access_key" --secret-key "$secret_key" >>"$setup_log" 2>&1 ||
        die "could not create the test user, see $setup_log"
fi
log "gateway up on $endpoint"
printf 'DISKPIPE_S3_ENDPOINT=%q\n' "$endpoint"
printf 'DISKPIPE_S3_ACCESS_KEY=%q\n' "$access_key"
printf 'DISKPIPE_S3_SECRET_KEY=%q\n' "$secret_key"
