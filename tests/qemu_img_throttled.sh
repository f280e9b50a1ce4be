#!/bin/sh
# qemu-img for the multi-host tests (DISKPIPE_QEMU_IMG): a conversion writes
# at most $DISKPIPE_TEST_QEMU_RATE bytes per second (qemu-img convert -r), so
# a job is still writing when a test cuts its host off. Real qemu-img,
# everything else unchanged.
if [ "$1" = convert ] && [ -n "${DISKPIPE_TEST_QEMU_RATE:-}" ]; then
    shift
    exec qemu-img convert -r "$DISKPIPE_TEST_QEMU_RATE" "$@"
fi
exec qemu-img "$@"
