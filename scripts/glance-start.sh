#!/usr/bin/env bash
# Start a throw-away OpenStack Glance API (glance 33 from PyPI, under gunicorn)
# with diskpipe's image-import plugin installed in Glance's own virtualenv,
# for tests, the Glance benchmark and experiments. No keystone: a small
# identity filter (written below, never part of diskpipe) hands every request
# a fixed project and user, as keystonemiddleware would after a login.
# SQLite database, file store; with --rbd also an RBD store on a Ceph cluster.
#
# Usage: scripts/glance-start.sh [--rbd CEPH_CONF] [--plugins LIST] [STATE_DIR]
#   eval "$(scripts/glance-start.sh)"   # sets DISKPIPE_GLANCE_URL
#   --rbd CEPH_CONF  add a second store, `ceph` (glance_store's rbd driver,
#                    pool $DISKPIPE_GLANCE_RBD_POOL, default rbd); the file
#                    store `local` stays the default
#   --plugins LIST   [image_import_opts] image_import_plugins, comma-separated
#                    (default: diskpipe; e.g. image_conversion for Glance's own)
#
# Environment:
#   DISKPIPE_GLANCE_DIR      state dir (default /tmp/diskpipe-glance); $1 wins
#   DISKPIPE_GLANCE_PORT     API port on 127.0.0.1 (default 9292)
#   DISKPIPE_GLANCE_VENV     Glance's virtualenv, built on first use and reused
#                            (default <repo>/.venv/glance, ignored by git)
#   DISKPIPE_GLANCE_PYTHON   its interpreter (default: the first Python 3.11
#                            found; Debian's rados/rbd modules are built for 3.11)
#   DISKPIPE_GLANCE_TIMEOUT  seconds to wait for the API to answer (default 120)
#   DISKPIPE_GLANCE_EXTRA_CONF  a file appended to glance-image-import.conf
#                            (e.g. a [diskpipe] section; read after
#                            glance-api.conf, so its values win)
#
# The virtualenv holds glance, the openstack and glance clients and gunicorn
# (pinned below), and diskpipe from this checkout (`pip install <repo>[glance]`),
# reinstalled whenever the checkout's code changed. Building it takes about
# two minutes with a cold pip cache; later starts take seconds.
#
# Re-running it on a state dir whose Glance is still up stops it
# (scripts/glance-stop.sh) and starts a fresh, empty one.
#
# Exit status: 0 up, 1 failed, 3 Glance cannot be installed here (see above).
#
# stdout: only eval-able lines; the last one is
# DISKPIPE_GLANCE_URL=http://127.0.0.1:<port>. Progress goes to stderr; the
# API's log is <STATE_DIR>/log/glance-api.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/.." && pwd -P)"
ceph_conf=""
plugins="diskpipe"
while (($#)); do
    case "$1" in
        --rbd)
            ceph_conf="${2:?--rbd needs a ceph.conf}"
            shift 2
            ;;
        --plugins)
            plugins="${2:?--plugins needs a list}"
            shift 2
            ;;
        -*)
            echo "usage: $0 [--rbd CEPH_CONF] [--plugins LIST] [STATE_DIR]" >&2
            exit 2
            ;;
        *) break ;;
    esac
done
dir="${1:-${DISKPIPE_GLANCE_DIR:-/tmp/diskpipe-glance}}"
port="${DISKPIPE_GLANCE_PORT:-9292}"
venv="${DISKPIPE_GLANCE_VENV:-$repo/.venv/glance}"
timeout_s="${DISKPIPE_GLANCE_TIMEOUT:-120}"
rbd_pool="${DISKPIPE_GLANCE_RBD_POOL:-rbd}"

# Versions resolved and verified together (glance 33 needs Python >= 3.11).
PINS=(
    glance==33.0.0 glance-store==5.7.0 python-openstackclient==10.5.0 python-glanceclient==4.13.0
    openstacksdk==4.22.0 taskflow==6.5.0 stevedore==5.10.0 oslo.config==10.7.0 oslo.db==18.1.1
    oslo.utils==10.2.0 SQLAlchemy==2.1.9 PasteDeploy==3.1.0 WebOb==1.8.11 gunicorn==27.0.1
)

die() {
    echo "glance-start: ERROR: $*" >&2
    exit 1
}
# Exit 3: Glance cannot be installed on this machine (no Python 3.11, no
# package index): callers such as the test suite may skip rather than fail.
cannot_install() {
    echo "glance-start: CANNOT INSTALL GLANCE: $*" >&2
    exit 3
}
log() { echo "glance-start: $*" >&2; }

[[ "$dir" != *[[:space:]]* ]] || die "state dir must not contain whitespace: '$dir'"
[[ "$port" =~ ^[0-9]+$ ]] || die "DISKPIPE_GLANCE_PORT must be a number, got '$port'"
[[ "$plugins" =~ ^[A-Za-z0-9_,]+$ ]] || die "--plugins takes names separated by commas, got '$plugins'"
[[ -z "$ceph_conf" || -r "$ceph_conf" ]] || die "--rbd: cannot read $ceph_conf"
command -v curl >/dev/null || die "curl not found (apt-get install curl)"

find_python() {
    local candidate
    if [[ -n "${DISKPIPE_GLANCE_PYTHON:-}" ]]; then
        echo "$DISKPIPE_GLANCE_PYTHON"
        return
    fi
    for candidate in python3.11 /usr/bin/python3.11 python3 /usr/bin/python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
}

# A digest of what diskpipe installs from this checkout: a change means reinstall.
source_digest() {
    (cd "$repo" && find diskpipe -name '*.py' -print0 | sort -z | xargs -0 cat pyproject.toml) | sha256sum | cut -d' ' -f1
}

build_venv() {
    local python stamp wanted log_file
    stamp="$venv/.diskpipe-glance-pins"
    wanted="${PINS[*]}"
    log_file="$(mktemp)"
    if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
        python="$(find_python)"
        [[ -n "$python" ]] || cannot_install "no Python 3.11 found for Glance's virtualenv (set DISKPIPE_GLANCE_PYTHON)"
        log "building Glance's virtualenv in $venv with $python (about two minutes the first time)"
        rm -rf -- "$venv"
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv" || cannot_install "python -m venv failed (apt-get install python3-venv)"
        if ! "$venv/bin/python" -m pip install -q "${PINS[@]}" >"$log_file" 2>&1; then
            tail -n 40 "$log_file" >&2
            rm -rf -- "$venv"
            cannot_install "pip install of Glance failed (is the package index reachable?)"
        fi
        echo "$wanted" >"$stamp"
        rm -f "$venv/.diskpipe-source"
    fi
    if [[ "$(cat "$venv/.diskpipe-source" 2>/dev/null)" != "$(source_digest)" ]]; then
        log "installing diskpipe from $repo into Glance's virtualenv"
        # A regular install, as an operator does it; then its dependencies.
        if ! "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$repo" >"$log_file" 2>&1 ||
            ! "$venv/bin/python" -m pip install -q "$repo[glance]" >>"$log_file" 2>&1; then
            cat "$log_file" >&2
            die "pip install of diskpipe into Glance's virtualenv failed"
        fi
        source_digest >"$venv/.diskpipe-source"
    fi
    rm -f "$log_file"
    # glance_store's rbd driver needs Debian's rados/rbd bindings (built for
    # Python 3.11); link those two modules only, not all of dist-packages.
    local site so
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    for so in /usr/lib/python3/dist-packages/rados.cpython-311-*.so /usr/lib/python3/dist-packages/rbd.cpython-311-*.so; do
        [[ -e "$so" ]] && ln -sf "$so" "$site/"
    done
    return 0
}

mkdir -p "$(dirname "$venv")"
(
    # One builder at a time (a test session and a benchmark may start together).
    flock 9
    build_venv
) 9>"$(dirname "$venv")/.glance-venv.lock"

if [[ -n "$ceph_conf" ]]; then
    "$venv/bin/python" -c 'import rados, rbd' 2>/dev/null ||
        die "--rbd: the rados/rbd Python modules do not load in $venv (apt-get install python3-rados python3-rbd; Python 3.11 needed)"
fi

mkdir -p "$dir"
dir="$(cd "$dir" && pwd -P)"
if [[ -e "$dir/.diskpipe-glance" ]]; then
    log "stopping previous Glance in $dir"
    "$here/glance-stop.sh" "$dir"
    mkdir -p "$dir"
elif [[ -n "$(ls -A "$dir")" ]]; then
    die "$dir exists, is not empty and was not created by this script"
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    rmdir "$dir" 2>/dev/null || true
    die "127.0.0.1:$port is already in use (set DISKPIPE_GLANCE_PORT)"
fi

touch "$dir/.diskpipe-glance"
mkdir -p "$dir/etc" "$dir/lib" "$dir/log" "$dir/data/images" "$dir/data/staging" "$dir/data/tasks"

backends="local:file"
[[ -z "$ceph_conf" ]] || backends="local:file, ceph:rbd"

cat >"$dir/etc/glance-api.conf" <<EOF
# Generated by scripts/glance-start.sh - throw-away instance, do not edit.
[DEFAULT]
enabled_backends = $backends
enabled_import_methods = [glance-direct,web-download,copy-image]
# The store location (file:// or rbd://) in `image show`'s direct_url.
show_image_direct_url = true
worker_self_reference_url = http://127.0.0.1:$port
debug = false
log_file = $dir/log/glance-api.log
image_cache_dir = $dir/data/cache

[database]
# timeout: SQLite lets one writer in at a time; wait up to 60 s for the lock
# (default 5 s) on a busy machine.
connection = sqlite:///$dir/glance.sqlite?timeout=60

[glance_store]
default_backend = local

[local]
filesystem_store_datadir = $dir/data/images/

[os_glance_staging_store]
filesystem_store_datadir = $dir/data/staging/

[os_glance_tasks_store]
filesystem_store_datadir = $dir/data/tasks/

[image_format]
# Glance's list plus the other formats qemu opens, so that every sample can
# be offered to the import plugin (which then accepts or refuses it).
disk_formats = ami,ari,aki,vhd,vhdx,vmdk,raw,qcow2,vdi,iso,ploop,qed,qcow,luks,bochs,cloop,dmg

[paste_deploy]
flavor = testidentity

[oslo_policy]
enforce_scope = false
enforce_new_defaults = false

[taskflow_executor]
engine_mode = serial

[wsgi]
python_interpreter = $venv/bin/python

[import_filtering_opts]
# web-download from this machine only (tests serve samples on 127.0.0.1), any port.
allowed_hosts = [127.0.0.1]
allowed_ports = []
EOF

if [[ -n "$ceph_conf" ]]; then
    cat >>"$dir/etc/glance-api.conf" <<EOF

[ceph]
rbd_store_ceph_conf = $ceph_conf
rbd_store_pool = $rbd_pool
rbd_store_chunk_size = 8
rbd_thin_provisioning = true
EOF
fi

cat >"$dir/etc/glance-image-import.conf" <<EOF
# Generated by scripts/glance-start.sh - throw-away instance, do not edit.
[image_import_opts]
image_import_plugins = [$plugins]

[image_conversion]
output_format = raw
EOF
if [[ -n "${DISKPIPE_GLANCE_EXTRA_CONF:-}" ]]; then
    cat "$DISKPIPE_GLANCE_EXTRA_CONF" >>"$dir/etc/glance-image-import.conf"
fi

# The paste pipeline of glance's stock file with keystone's place taken by
# the test identity filter, then glance's own `context` filter.
cat >"$dir/etc/glance-api-paste.ini" <<'EOF'
[composite:glance-api-testidentity]
paste.composite_factory = glance.api:root_app_factory
/: api
/healthcheck: healthcheck

[composite:api]
paste.composite_factory = glance.api:pipeline_factory
testidentity = cors http_proxy_to_wsgi versionnegotiation testidentity context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = /nonexistent/glance-healthcheck-disable

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = glance
oslo_config_program = glance-api

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory

[filter:testidentity]
paste.filter_factory = diskpipe_glance_test_identity:filter_factory
project_id = diskpipe-test-project
user_id = diskpipe-test-user
roles = admin,member,reader
EOF

cat >"$dir/lib/diskpipe_glance_test_identity.py" <<'EOF'
"""Test-only stand-in for keystonemiddleware (written by glance-start.sh):
every request is treated as authenticated, with the identity in the paste
config. Never deploy this."""

IDENTITY_HEADERS = ("HTTP_X_PROJECT_ID", "HTTP_X_TENANT_ID", "HTTP_X_USER_ID", "HTTP_X_ROLES", "HTTP_X_IDENTITY_STATUS")


def filter_factory(global_conf, **local_conf):
    identity = {
        "HTTP_X_PROJECT_ID": local_conf["project_id"],
        "HTTP_X_TENANT_ID": local_conf["project_id"],
        "HTTP_X_USER_ID": local_conf["user_id"],
        "HTTP_X_ROLES": local_conf["roles"],
        "HTTP_X_IDENTITY_STATUS": "Confirmed",
    }

    def wrap(app):
        def middleware(environ, start_response):
            for header in IDENTITY_HEADERS:
                environ.pop(header, None)  # a client cannot choose who it is
            environ.update(identity)
            return app(environ, start_response)

        return middleware

    return wrap
EOF

log "creating Glance's database"
if ! "$venv/bin/glance-manage" --config-dir "$dir/etc" db_sync >"$dir/log/db_sync.log" 2>&1; then
    tail -n 30 "$dir/log/db_sync.log" >&2
    die "glance-manage db_sync failed"
fi

# setsid: Glance and whatever it runs (qemu-img) form one process group that
# glance-stop.sh can end together. --chdir: gunicorn puts its working
# directory first on sys.path, and the checkout's own diskpipe must not
# shadow the one installed in Glance's virtualenv.
OS_GLANCE_CONFIG_DIR="$dir/etc" PYTHONPATH="$dir/lib" setsid "$venv/bin/gunicorn" \
    --bind "127.0.0.1:$port" --workers 1 --threads 4 --timeout 600 --graceful-timeout 10 \
    --no-control-socket --pid "$dir/glance.pid" --error-logfile "$dir/log/gunicorn.log" --chdir "$dir" \
    glance.wsgi.api:application </dev/null >>"$dir/log/gunicorn.log" 2>&1 &
echo $! >"$dir/glance.pid"

url="http://127.0.0.1:$port"
deadline=$((SECONDS + timeout_s))
until [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/v2/images" 2>/dev/null)" == 200 ]]; do
    if ! kill -0 "$(cat "$dir/glance.pid")" 2>/dev/null || ((SECONDS >= deadline)); then
        {
            echo "glance-start: ERROR: Glance did not answer on $url within ${timeout_s}s. Tail of its logs:"
            tail -n 30 "$dir/log/gunicorn.log" "$dir/log/glance-api.log" 2>/dev/null || true
            echo "(clean up with: $here/glance-stop.sh $dir)"
        } >&2
        exit 1
    fi
    sleep 0.3
done

log "Glance up on $url (pid $(cat "$dir/glance.pid"), plugins [$plugins], stores [$backends], dir $dir)"
echo "DISKPIPE_GLANCE_VENV=$venv"
echo "DISKPIPE_GLANCE_URL=$url"
