#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, the virtualenv with the
# test extras) and runs the whole suite. The tests start their own Redis and
# one-node Ceph (scripts/redis-start.sh, scripts/ceph-start.sh) and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check diskpipe tests samples benchmarks
.venv/bin/ruff format --check diskpipe tests samples benchmarks
.venv/bin/mypy
# --durations=25: the slowest tests in every CI log, to see what a slow run
# spent its time on (the suite must stay well under CI's limit).
exec .venv/bin/python -m pytest -q --durations=25 "$@"
