"""VMDK: binary sparse extents (KDMV, COWD) and text descriptors. docs/formats.md §6.

The inspector never opens an extent or any other file an image names: a text
descriptor's extents are reported with the sizes the descriptor states.
"""

from __future__ import annotations

from diskpipe.formats import allocation, vmdk_descriptor
from diskpipe.formats.base import ContainerFormat, InspectOptions, read_exact
from diskpipe.formats.errors import FormatError, Unavailable
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, nonzero_from, round_up
from diskpipe.formats.reads import MAX_READ, GetSize, Read, ReadTail, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "vmdk"
MAGIC_VMDK4 = b"KDMV"
MAGIC_VMDK3 = b"COWD"
HEADER = Layout(NAME, "sparse extent header", "<", """
    0   4s  magic
    4   I   version
    8   I   flags
    12  Q   capacity
    20  Q   grain_size
    28  Q   descriptor_offset
    36  Q   descriptor_size
    44  I   gtes_per_gt
    48  Q   rgd_offset
    56  Q   gd_offset
    64  Q   overhead
    72  B   unclean_shutdown
    73  4s  newline_chars
    77  H   compress_algorithm
""")  # fmt: skip
COWD_HEADER = Layout(NAME, "COWD header", "<", """
    0   4s  magic
    4   I   version
    8   I   flags
    12  I   capacity
    16  I   granularity
    20  I   l1dir_offset
    24  I   l1dir_size
    28  I   file_sectors
""")  # fmt: skip
MARKER = Layout(NAME, "stream marker", "<", "0 Q value, 8 I size, 12 I type")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_END_OF_STREAM, MARKER_FOOTER = 0, 3
FLAG_ZEROED_GRAIN = 1 << 2
COMPRESSION_DEFLATE = 1
# qemu reads this much text at byte 512 of a sparse file for CID and parent hint.
EMBEDDED_DESCRIPTOR_OFFSET = 512
EMBEDDED_DESCRIPTOR_READ = 10 * 1024
TEXT_DESCRIPTOR_LIMIT = 1024 * 1024 - 1  # qemu reads at most this much of a text descriptor
MAX_GRAIN_SECTORS = 0x200000
MAX_GTES_PER_GT = 512
MAX_GD_ENTRIES = 32 * 1024 * 1024
GTE_ZEROED = 1
CID_MESSAGE = "descriptor has no CID and parentCID hex numbers (qemu refuses to open it)"


def probe(buffer: bytes) -> bool:
    return buffer[:4] in (MAGIC_VMDK4, MAGIC_VMDK3) or vmdk_descriptor.probe_text(buffer)


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    if head[:4] == MAGIC_VMDK4:
        return (yield from _inspect_sparse(head, options))
    if head[:4] == MAGIC_VMDK3:
        return (yield from _inspect_cowd(head))
    return (yield from _inspect_text(head))


def _extent_checks(header: dict[str, Any]) -> None:
    """qemu's vmdk_add_extent refusals."""
    if header["gtes_per_gt"] * header["grain_size"] == 0:
        raise FormatError(NAME, "L1 entry size is invalid", field="gtes_per_gt", offset=44)
    if header["grain_size"] > MAX_GRAIN_SECTORS:
        raise FormatError(NAME, "invalid granularity, image may be corrupt", field="grain_size", offset=20)
    if header["gtes_per_gt"] > MAX_GTES_PER_GT:
        raise FormatError(NAME, "L2 table size too big", field="gtes_per_gt", offset=44)
    if _gd_entries(header) > MAX_GD_ENTRIES:
        raise FormatError(NAME, "L1 size too big", field="capacity", offset=12)


def _gd_entries(header: dict[str, Any]) -> int:
    span: int = header["gtes_per_gt"] * header["grain_size"]
    capacity: int = header["capacity"]
    return -(-capacity // span)


def _read_footer(
    head_header: dict[str, Any], anomalies: list[dict[str, str]]
) -> Generator[Request, Any, dict[str, Any] | None]:
    """The header copy in a stream footer (GD_AT_END), checked as qemu checks it."""
    file_size: int = yield GetSize()
    tail: bytes = yield ReadTail(2048)
    # qemu reads at (size rounded up to a sector) - 1536; map that into the tail.
    footer_start = round_up(file_size, 512) - 1536 - (file_size - len(tail))
    raw = tail[footer_start : footer_start + 1536] if footer_start >= 0 else b""
    raw = raw.ljust(1536, b"\0")
    footer_marker = MARKER.parse(raw, 0)
    eos_marker = MARKER.parse(raw, 1024)
    valid = (
        raw[512:516] == MAGIC_VMDK4
        and footer_marker["size"] == 0
        and footer_marker["type"] == MARKER_FOOTER
        and eos_marker == {"value": 0, "size": 0, "type": MARKER_END_OF_STREAM}
    )
    if not valid:
        anomalies.append(
            {
                "name": "stream_footer",
                "message": "invalid footer: the GD is at the end but no footer and end-of-stream marker are",
            }
        )
        return None
    footer_header = HEADER.parse(raw, 512)
    for field in (
        "capacity",
        "grain_size",
        "gtes_per_gt",
        "compress_algorithm",
        "descriptor_offset",
        "descriptor_size",
    ):
        if footer_header[field] != head_header[field]:
            anomalies.append({"name": "stream_footer", "message": f"footer header disagrees with the head on {field}"})
    if footer_header["gd_offset"] == GD_AT_END:
        anomalies.append({"name": "stream_footer", "message": "footer header has no grain directory offset"})
    return footer_header


def _check_end_of_stream(anomalies: list[dict[str, str]]) -> Generator[Request, Any, None]:
    """A streamOptimized file ends with an end-of-stream marker (512 bytes,
    value, size and type zero)."""
    file_size: int = yield GetSize()
    tail: bytes = yield ReadTail(512)
    if (
        file_size % 512
        or len(tail) < 512
        or MARKER.parse(tail) != {"value": 0, "size": 0, "type": MARKER_END_OF_STREAM}
    ):
        anomalies.append(
            {"name": "end_of_stream", "message": "streamOptimized file does not end with an end-of-stream marker"}
        )


def _inspect_sparse(head: bytes, options: InspectOptions) -> Generator[Request, Any, Facts]:
    header = HEADER.parse(head)
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"version": header["version"], "anomalies": anomalies}
    if header["version"] > 3:
        anomalies.append({"name": "unsupported_version", "message": f"unsupported VMDK version {header['version']}"})
    compressed = header["compress_algorithm"] == COMPRESSION_DEFLATE
    descriptor, qemu_view = yield from _read_embedded_descriptor(header, head, anomalies, details)

    if header["capacity"] == 0 and header["descriptor_offset"]:
        # qemu then opens the embedded descriptor as if it were a descriptor file.
        anomalies.append(
            {
                "name": "descriptor_as_file",
                "message": "capacity 0: qemu reads the embedded descriptor as a descriptor file",
            }
        )
        # The extents come from the header's region; CID and parent hint, as
        # always for a binary extent, from qemu's 10 KiB at byte 512.
        return _descriptor_facts(descriptor, details, anomalies, qemu_view=qemu_view)

    effective = yield from _effective_header(header, compressed, anomalies)
    allocated = None
    data_end = 0
    if options.allocation and effective["gd_offset"] != GD_AT_END:
        try:
            allocated, data_end = yield from _count_allocation(effective)
        except Unavailable:
            allocated = None
    file_size: int = yield GetSize()
    _check_against_file_size(effective, data_end, file_size, anomalies)

    create_type = "streamOptimized" if compressed else "monolithicSparse"
    capacity_bytes = effective["capacity"] * 512
    extent: dict[str, Any] = {
        "virtual-size": capacity_bytes,
        "cluster-size": effective["grain_size"] * 512,
        "format": "",
    }
    if compressed:
        extent["compressed"] = True
    details["create-type"] = create_type
    return _extent_facts(qemu_view, extent, create_type, create_type, details, allocated)


def _read_embedded_descriptor(
    header: dict[str, Any], head: bytes, anomalies: list[dict[str, str]], details: dict[str, Any]
) -> Generator[Request, Any, tuple[vmdk_descriptor.Descriptor, vmdk_descriptor.Descriptor]]:
    """The embedded descriptor twice: as the header's region holds it (for
    the strict reading) and as qemu reads it, 10 KiB at byte 512 (for CID
    and parent hint). Raises when qemu would find no CID."""
    region_offset = header["descriptor_offset"] * 512
    region_size = header["descriptor_size"] * 512
    details["descriptor-region"] = {"offset": region_offset, "bytes": region_size}
    if region_size > MAX_READ:
        anomalies.append(
            {"name": "descriptor_too_large", "message": f"embedded descriptor region of {region_size} bytes"}
        )
    qemu_text = yield from read_exact(EMBEDDED_DESCRIPTOR_OFFSET, EMBEDDED_DESCRIPTOR_READ, head)
    qemu_view = vmdk_descriptor.parse(qemu_text)
    descriptor = qemu_view
    if header["descriptor_offset"] and region_offset != EMBEDDED_DESCRIPTOR_OFFSET:
        anomalies.append(
            {"name": "descriptor_offset", "message": f"descriptor at byte {region_offset}, qemu reads byte 512"}
        )
        region = yield from read_exact(region_offset, min(region_size, MAX_READ), head)
        descriptor = vmdk_descriptor.parse(region)
    elif header["descriptor_offset"]:
        # The usual region is exactly the 10 KiB qemu reads: same bytes, same
        # reading. Asked for with the same request it is those bytes, so it
        # is neither cut again nor compared.
        if region_size != EMBEDDED_DESCRIPTOR_READ:
            region = yield from read_exact(region_offset, min(region_size, MAX_READ), head)
            descriptor = qemu_view if region == qemu_text else vmdk_descriptor.parse(region)
        # Text past the header's region that qemu still reads in its 10 KiB.
        if region_size < EMBEDDED_DESCRIPTOR_READ and nonzero_from(qemu_text, region_size):
            descriptor.hidden_text = True
    details["descriptor"] = descriptor.to_json()
    if not qemu_view.cid_valid:
        raise FormatError(NAME, CID_MESSAGE, offset=EMBEDDED_DESCRIPTOR_OFFSET)
    return descriptor, qemu_view


def _effective_header(
    header: dict[str, Any], compressed: bool, anomalies: list[dict[str, str]]
) -> Generator[Request, Any, dict[str, Any]]:
    """The header qemu goes by: the stream footer's copy when the grain
    directory is at the end and the footer is valid, else the head's."""
    _extent_checks(header)
    if header["gd_offset"] == GD_AT_END:
        footer_header = yield from _read_footer(header, anomalies)
        if footer_header is not None:
            _extent_checks(footer_header)
            return footer_header
    elif compressed:
        yield from _check_end_of_stream(anomalies)
    return header


def _check_against_file_size(
    header: dict[str, Any], data_end: int, file_size: int, anomalies: list[dict[str, str]]
) -> None:
    if file_size < header["overhead"] * 512:
        raise FormatError(NAME, f"file truncated, expecting at least {header['overhead'] * 512} bytes", offset=64)
    if data_end > round_up(file_size, 512):
        anomalies.append({"name": "allocation_past_eof", "message": "grain tables point past the end of the file"})
    if header["gd_offset"] != GD_AT_END:
        # Known from the header (or footer) and the size alone, so a stream
        # decides it too. qemu reads zeros there, or fails on a huge offset.
        gd_start = header["gd_offset"] * 512
        if gd_start + _gd_entries(header) * 4 > round_up(file_size, 512):
            anomalies.append(
                {"name": "gd_past_eof", "message": f"grain directory at byte {gd_start} lies past the end of the file"}
            )


def _extent_facts(
    qemu_view: vmdk_descriptor.Descriptor,
    extent: dict[str, Any],
    subformat: str,
    qemu_create_type: str,
    details: dict[str, Any],
    allocated: int | None,
) -> Facts:
    """Facts of a binary extent opened on its own; `qemu_view` is the
    descriptor text qemu takes the CIDs and the parent hint from."""
    return Facts(
        format=NAME,
        virtual_size=extent["virtual-size"],
        cluster_size=extent["cluster-size"],
        backing_file=qemu_view.parent_hint,
        backing_file_format="vmdk" if qemu_view.parent_hint is not None else None,
        subformat=subformat,
        format_specific=_format_specific(qemu_view, qemu_create_type, [extent]),
        details=details,
        allocated_size=allocated,
    )


def _format_specific(
    descriptor: vmdk_descriptor.Descriptor, create_type: str, extents: list[dict[str, Any]]
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "cid": descriptor.cid if descriptor.cid is not None else 0,
        "parent-cid": descriptor.parent_cid if descriptor.parent_cid is not None else 0xFFFFFFFF,
        "create-type": create_type,
        "extents": extents,
    }
    return {"type": NAME, "data": data}


def _inspect_cowd(head: bytes) -> Generator[Request, Any, Facts]:
    """VMDK3 (ESX 2 "COWD" sparse): qemu still opens it; policy refuses it.

    qemu reads the same 10 KiB of descriptor text at byte 512 as for a KDMV
    extent: it needs a CID there, and follows its parentFileNameHint.
    """
    header = COWD_HEADER.parse(head)
    if header["granularity"] == 0 or header["granularity"] > MAX_GRAIN_SECTORS:
        raise FormatError(NAME, "invalid granularity, image may be corrupt", field="granularity", offset=16)
    qemu_text = yield from read_exact(EMBEDDED_DESCRIPTOR_OFFSET, EMBEDDED_DESCRIPTOR_READ, head)
    descriptor = vmdk_descriptor.parse(qemu_text)
    if not descriptor.cid_valid:
        raise FormatError(NAME, CID_MESSAGE, offset=EMBEDDED_DESCRIPTOR_OFFSET)
    file_size: int = yield GetSize()
    details = {
        "version": header["version"],
        "anomalies": [],
        "create-type": "vmfsSparse",
        "file-size": file_size,
        "descriptor": descriptor.to_json(),
    }
    capacity_bytes = header["capacity"] * 512
    # qemu names no create-type or extent format for a COWD extent.
    extent = {"virtual-size": capacity_bytes, "cluster-size": header["granularity"] * 512, "format": ""}
    return _extent_facts(descriptor, extent, "vmfsSparse", "", details, None)


def _inspect_text(head: bytes) -> Generator[Request, Any, Facts]:
    text = yield from read_exact(0, TEXT_DESCRIPTOR_LIMIT, head)
    file_size: int = yield GetSize()
    descriptor = vmdk_descriptor.parse(text)
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"descriptor": descriptor.to_json(), "anomalies": anomalies, "text-descriptor": True}
    if file_size > TEXT_DESCRIPTOR_LIMIT:
        anomalies.append(
            {
                "name": "descriptor_too_large",
                "message": f"descriptor file of {file_size} bytes; qemu reads only the first 1 MiB",
            }
        )
    if not descriptor.cid_valid:
        raise FormatError(NAME, CID_MESSAGE, offset=0)
    return _descriptor_facts(descriptor, details, anomalies, qemu_view=descriptor)


def _descriptor_facts(
    descriptor: vmdk_descriptor.Descriptor,
    details: dict[str, Any],
    anomalies: list[dict[str, str]],
    *,
    qemu_view: vmdk_descriptor.Descriptor,
) -> Facts:
    """Facts of a descriptor that qemu opens as a descriptor file;
    `qemu_view` is the text qemu takes the CIDs and parent hint from."""
    parent_hint = qemu_view.parent_hint
    create_type = descriptor.create_type
    if create_type is None:
        raise FormatError(NAME, "invalid VMDK image descriptor (no createType)")
    details["create-type"] = create_type
    if create_type not in vmdk_descriptor.TEXT_CREATE_TYPES:
        anomalies.append(
            {"name": "descriptor_create_type", "message": f"qemu does not open a descriptor of type {create_type!r}"}
        )
    sectors = 0
    extents_json: list[dict[str, Any]] = []
    for extent in descriptor.extents:
        # qemu's order: non-RW lines are skipped before anything is checked.
        if extent.access != "RW":
            continue
        line = f'{extent.access} {extent.sectors} {extent.type} "{extent.filename}"'
        if extent.type == "FLAT":
            if extent.offset is None or extent.offset < 0:
                raise FormatError(NAME, f"invalid extent line: {line} (FLAT needs an offset)")
        elif extent.offset is not None:
            raise FormatError(NAME, f"invalid extent line: {line} {extent.offset}")
        if extent.sectors <= 0 or extent.type not in vmdk_descriptor.EXTENT_TYPES:
            continue
        sectors += extent.sectors
        entry: dict[str, Any] = {
            "virtual-size": extent.sectors * 512,
            "filename": extent.filename,
            "format": extent.type,
        }
        extents_json.append(entry)
    details["sizes-from-descriptor"] = any(
        extent["format"] not in vmdk_descriptor.FLAT_TYPES for extent in extents_json
    )
    return Facts(
        format=NAME,
        virtual_size=sectors * 512,
        backing_file=parent_hint,
        backing_file_format="vmdk" if parent_hint is not None else None,
        subformat=create_type,
        format_specific=_format_specific(qemu_view, create_type, extents_json),
        details=details,
    )


def _count_allocation(header: dict[str, Any]) -> Generator[Request, Any, tuple[int, int]]:
    """(guest bytes in allocated grains, end of the furthest grain or table)."""
    np = allocation.numpy()
    grain_bytes = header["grain_size"] * 512
    gtes = header["gtes_per_gt"]
    capacity = header["capacity"] * 512
    zeroed_grain = bool(header["flags"] & FLAG_ZEROED_GRAIN)
    # A compressed grain occupies at least one sector; its true length needs
    # its marker, which is not read here.
    grain_span = 512 if header["compress_algorithm"] == COMPRESSION_DEFLATE else grain_bytes
    gd_entries = _gd_entries(header)
    total = 0
    data_end = 0
    for first_index, piece_offset, piece_length in allocation.table_pieces(
        header["gd_offset"] * 512, gd_entries * 4, 4
    ):
        piece: bytes = yield Read(piece_offset, piece_length)
        if not piece:
            break  # past the end of the data: the rest of the table reads as zeros
        directory = np.frombuffer(piece.ljust(piece_length, b"\0"), dtype="<u4")
        present = np.nonzero(directory)[0]
        offsets = directory[present].astype(np.int64) * 512
        if np.unique(offsets).size != offsets.size:
            raise FormatError(NAME, "two grain directory entries point at the same grain table")
        for gd_index, table_offset in zip(
            (present[np.argsort(offsets, kind="stable")] + first_index).tolist(), np.sort(offsets).tolist(), strict=True
        ):
            table: bytes = yield Read(table_offset, gtes * 4)
            data_end = max(data_end, table_offset + gtes * 4)
            if not table:
                # Past the end, as are the later (higher) tables of this piece.
                data_end = max(data_end, int(offsets.max()) + gtes * 4)
                break
            entries = np.frombuffer(table.ljust(gtes * 4, b"\0"), dtype="<u4")
            allocated = entries != 0
            if zeroed_grain:
                allocated &= entries != GTE_ZEROED
            grains = np.nonzero(allocated)[0]
            if grains.size:
                data_end = max(data_end, int(entries[grains].max()) * 512 + grain_span)
                total += allocation.clip_to_size(grains.astype(np.int64) + gd_index * gtes, grain_bytes, capacity)
    return total, data_end


FORMAT = ContainerFormat(NAME, probe, inspect)
