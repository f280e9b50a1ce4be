#!/usr/bin/env bash
# The main job on the embedded default, no servers needed: set up, make the
# sample images, inspect them, then import an honest and a hostile one into
# the local file store and list the records.
#
#   bash scripts/demo.sh [OUTDIR]     (default: ./out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-out}")"

bash scripts/setup.sh
diskpipe=".venv/bin/diskpipe"

echo "== making sample images in $out/samples"
.venv/bin/python -m samples "$out/samples"

echo "== what they really are (diskpipe info)"
"$diskpipe" info \
    "$out/samples/qcow2/qcow2-v3-c64k.qcow2" \
    "$out/samples/vhd/vhd-fixed-1g.vhd" \
    "$out/samples/iso/iso-hybrid.iso" \
    "$out/samples/hostile/qcow2-over-iso.iso"

echo "== the whole import into the local file store ($out/store)"
export XDG_DATA_HOME="$out/data"
export DISKPIPE_STORE_DIRECTORY="$out/store"
export DISKPIPE_STORE_RECORDS="$out/records.sqlite"
"$diskpipe" import "$out/samples/vmdk/vmdk-stream-data.vmdk" --claimed-format vmdk || true
"$diskpipe" import "$out/samples/hostile/qcow2-backing-passwd.qcow2" --claimed-format qcow2 || true
echo "== records"
"$diskpipe" list
