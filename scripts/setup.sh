#!/usr/bin/env bash
# Installs what diskpipe needs on a Debian 12 machine: the Debian packages
# (qemu-img, libmagic, Redis, a one-node Ceph's daemons and client bindings,
# the RADOS Gateway the S3 store's tests use, the tools the sample generator uses) and a virtualenv in .venv with
# diskpipe and its `tasks` extra (Celery, Redis: the job commands and the
# worker need them) installed, and its shell completion scripts (bash, zsh)
# under .venv/share. `--test` adds the test extras, `--bench` the benchmark
# extras, `--no-apt` skips the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

with_apt=1
# The job commands (`diskpipe import --broker`, status, list, cancel...) and
# `celery -A diskpipe.tasks worker` import Celery and redis: always installed.
extras="tasks"
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
    iproute2  # ip netns: the worker hosts of scripts/netns-hosts.sh (tests/test_multihost.py, benchmarks/scale_out.py)
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

# Debian's rados/rbd bindings belong to Debian's own interpreter
# (/usr/bin/python3, 3.11 on Debian 12): the virtualenv is built on it, not
# on whatever python3.11 comes first on PATH. A pyenv or other build under a
# home directory would also tie the virtualenv to a path that only its owner
# can read, and a worker's service user could not start it.
python_bin="${DISKPIPE_PYTHON:-/usr/bin/python3}"
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null ||
    { echo "setup: $python_bin is not a Python 3.11 (Debian 12's python3; or set DISKPIPE_PYTHON)" >&2; exit 1; }
base_python() { "$1" -c 'import os, sys; print(os.path.realpath(sys._base_executable))'; }
if [ -x .venv/bin/python ] && [ "$(base_python .venv/bin/python 2>/dev/null)" != "$(base_python "$python_bin")" ]; then
    echo "setup: rebuilding .venv on $python_bin (it was made with $(base_python .venv/bin/python 2>/dev/null || echo 'a missing interpreter'))" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
spec=".[completion${extras:+,$extras}]"
log=$(mktemp)
# setuptools keeps build/lib between installs: a module removed from the
# tree would be installed again from there.
rm -rf build
# pip 25 and later write the `diskpipe` console script without `import re`
# (a few milliseconds of every start, see benchmarks/inspect_speed.py); an
# older pip still installs a working one, so a failed upgrade is no error.
.venv/bin/python -m pip install -q --upgrade "pip>=25" >"$log" 2>&1 ||
    echo "setup: pip not upgraded (the diskpipe command will start a little slower)" >&2
# A regular (not editable) install: an editable install's import hook costs
# the `diskpipe` command ~15 ms at every start. Developers who want one:
# `.venv/bin/pip install -e . --config-settings editable_mode=compat`.
# --compile: pip writes the .pyc files at install (PYTHONDONTWRITEBYTECODE
# stops only the interpreter writing them at import; PIP_NO_COMPILE or a
# pip.conf could turn pip's off). A service user cannot write them into this
# tree later, and without them every start compiles diskpipe's modules:
# ~43 ms of CPU on a ~30 ms `diskpipe info`.
if ! .venv/bin/python -m pip install -q --compile --force-reinstall --no-deps . >"$log" 2>&1 ||
    ! .venv/bin/python -m pip install -q --compile "$spec" >>"$log" 2>&1; then
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

# Shell completion, generated by shtab from the parser just installed, so it
# always matches the options: bash-completion and zsh find these under a
# prefix they are given (README, "Command line").
mkdir -p .venv/share/bash-completion/completions .venv/share/zsh/site-functions
.venv/bin/diskpipe completion bash >.venv/share/bash-completion/completions/diskpipe
.venv/bin/diskpipe completion zsh >.venv/share/zsh/site-functions/_diskpipe

# A worker runs as a service user: the virtualenv must be readable by others
# (whatever the umask was), and every directory above it searchable.
chmod -R a+rX .venv
path="$(pwd -P)"
while [ "$path" != / ]; do
    if [ "$(stat -c %A "$path" | cut -c10)" != x ] && [ "$(stat -c %A "$path" | cut -c10)" != t ]; then
        echo "setup: note: $path is not searchable by other users, so only $(stat -c %U "$path") can run .venv;" \
            "for a service user, put the checkout elsewhere (e.g. /opt/diskpipe), see the README's \"Deploying workers\"" >&2
        break
    fi
    path="$(dirname "$path")"
done

.venv/bin/python -c 'import diskpipe.formats, celery, redis' && echo "setup: ready (.venv)" >&2
