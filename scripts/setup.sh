#!/usr/bin/env bash
# Installs what diskpipe needs on a Debian 12 machine: the Debian packages
# (qemu-img, libmagic, Redis, a one-node Ceph's daemons and client bindings,
# the RADOS Gateway the S3 store's tests use, the tools the sample generator uses) and a virtualenv in .venv with
# diskpipe installed. `--test` adds the test extras, `--bench` the benchmark
# extras, `--no-apt` skips the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

with_apt=1
extras=""
for arg in "$@"; do
    case "$arg" in
        --test) extras="${extras:+$extras,}test" ;;
        --bench) extras="${extras:+$extras,}bench,test" ;;
        --no-apt) with_apt=0 ;;
        *) echo "usage: $0 [--test] [--bench] [--no-apt]" >&2; exit 2 ;;
    esac
done

APT_PACKAGES=(
    qemu-utils qemu-block-extra libmagic1
    redis-server
    ceph-mon ceph-osd ceph-common python3-rados python3-rbd radosgw
    cryptsetup-bin gdisk fdisk e2fsprogs xfsprogs btrfs-progs squashfs-tools dosfstools
    cpio gzip xz-utils zstd lz4 bzip2 debootstrap
    python3-venv
    curl openssl util-linux  # rgw-start.sh waits with curl; the TLS download tests make a certificate; setpriv and prlimit
)

if [ "$with_apt" = 1 ]; then
    missing=()
    for package in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        sudo_cmd=""
        [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
        echo "setup: installing ${missing[*]}" >&2
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# Debian's rados/rbd bindings are built for its Python 3.11: the virtualenv
# must use a 3.11 interpreter so the same extension modules load.
python_bin="${DISKPIPE_PYTHON:-}"
if [ -z "$python_bin" ]; then
    for candidate in python3.11 python3 /usr/bin/python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            python_bin="$candidate"
            break
        fi
    done
fi
[ -n "$python_bin" ] || { echo "setup: no Python 3.11 found (set DISKPIPE_PYTHON)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
log=$(mktemp)
# pip 25 and later write the `diskpipe` console script without `import re`
# (a few milliseconds of every start, see benchmarks/inspect_speed.py); an
# older pip still installs a working one, so a failed upgrade is no error.
.venv/bin/python -m pip install -q --upgrade "pip>=25" >"$log" 2>&1 ||
    echo "setup: pip not upgraded (the diskpipe command will start a little slower)" >&2
# A regular (not editable) install: an editable install's import hook costs
# the `diskpipe` command ~15 ms at every start. Developers who want one:
# `.venv/bin/pip install -e . --config-settings editable_mode=compat`.
if ! .venv/bin/python -m pip install -q --force-reinstall --no-deps . >"$log" 2>&1 ||
    ! .venv/bin/python -m pip install -q "$spec" >>"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: pip install failed" >&2
    exit 1
fi
rm -f "$log"

# Make the virtualenv see Debian's rados/rbd extension modules (and only
# those, not the rest of /usr/lib/python3/dist-packages).
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for module in rados rbd; do
    for so in /usr/lib/python3/dist-packages/"$module".cpython-311-*.so; do
        [ -e "$so" ] && ln -sf "$so" "$site_packages/"
    done
done
.venv/bin/python -c 'import diskpipe.formats' && echo "setup: ready (.venv)" >&2
