"""qcow version 1 (`format: qcow`): old, still opened by qemu, refused by policy.

FORMATS.md §1.5; qemu block/qcow.c.
"""

from __future__ import annotations

from typing import Any

from diskpipe.formats.base import ContainerFormat, Inspection, InspectOptions, read_exact
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, c_string

NAME = "qcow"
MAGIC = b"QFI\xfb"
HEADER = Layout(NAME, "header", ">", [
    (0, "4s", "magic"),
    (4, "I", "version"),
    (8, "Q", "backing_file_offset"),
    (16, "I", "backing_file_size"),
    (20, "I", "mtime"),
    (24, "Q", "size"),
    (32, "B", "cluster_bits"),
    (33, "B", "l2_bits"),
    (36, "I", "crypt_method"),
    (40, "Q", "l1_table_offset"),
])  # fmt: skip
MAX_BACKING_NAME = 1023


def probe(buffer: bytes) -> bool:
    return buffer[:4] == MAGIC and int.from_bytes(buffer[4:8], "big") == 1


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    header = HEADER.parse(head)
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"version": 1, "anomalies": anomalies}
    cluster_bits = header["cluster_bits"]
    if not 9 <= cluster_bits <= 16:
        anomalies.append({"name": "cluster_size", "message": "cluster size must be between 512 and 64k"})
    if not 6 <= header["l2_bits"] <= 13:
        anomalies.append({"name": "l2_size", "message": "L2 table size must be between 512 and 64k"})
    if header["crypt_method"] > 1:
        anomalies.append({"name": "crypt_method", "message": f"invalid encryption method {header['crypt_method']}"})
    backing_file = None
    if header["backing_file_offset"] and header["backing_file_size"]:
        size = header["backing_file_size"]
        if size > MAX_BACKING_NAME:
            anomalies.append({"name": "backing_file_name", "message": "backing file name too long"})
        raw = yield from read_exact(header["backing_file_offset"], min(size, MAX_BACKING_NAME + 1), head)
        backing_file = c_string(raw)
    return Facts(
        format=NAME,
        virtual_size=header["size"] // 512 * 512,
        cluster_size=1 << cluster_bits if 9 <= cluster_bits <= 16 else None,
        backing_file=backing_file,
        encrypted=header["crypt_method"] != 0,
        subformat="qcow1",
        details=details,
    )


FORMAT = ContainerFormat(NAME, probe, inspect)
