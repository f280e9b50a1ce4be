"""The facts an inspection finds: `ImageInfo` and the pieces it is made of."""

from __future__ import annotations

from types import MappingProxyType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from diskpipe.formats.tuples import NamedTuple

# An immutable empty mapping: a safe default for `details` (NamedTuples have
# no default factories; the classes are NamedTuples rather than dataclasses
# because importing dataclasses costs the CLI several milliseconds).
NO_DETAILS: dict[str, Any] = MappingProxyType({})  # type: ignore[assignment]

# Glance's disk_format names for qemu drivers that have one. Drivers Glance
# has no name for keep their qemu name (qcow, qed, luks, bochs, cloop, dmg).
GLANCE_DISK_FORMAT = {
    "raw": "raw",
    "qcow2": "qcow2",
    "qcow": "qcow",
    "vpc": "vhd",
    "vhdx": "vhdx",
    "vmdk": "vmdk",
    "vdi": "vdi",
    "qed": "qed",
    "parallels": "ploop",
    "luks": "luks",
    "bochs": "bochs",
    "cloop": "cloop",
    "dmg": "dmg",
}


class Content(NamedTuple):
    """Something recognised inside raw data: an ISO, a partition table, ...

    `kind` is one of: iso, udf, gpt, mbr, filesystem, kernel, ramdisk,
    compressed, luks2, archive, text, boot-sector; `name` narrows it
    (ext4, bzImage, gzip, ...).
    """

    kind: str
    name: str
    details: dict[str, Any] = NO_DETAILS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.details:
            out["details"] = self.details
        return out


class Facts(NamedTuple):
    """What one container inspector found (merged into `ImageInfo`)."""

    format: str
    virtual_size: int
    cluster_size: int | None = None
    backing_file: str | None = None
    backing_file_format: str | None = None
    data_file: str | None = None
    encrypted: bool = False
    dirty: bool | None = False  # None: qemu reports no dirty-flag for this driver
    corrupt: bool = False
    subformat: str | None = None
    format_specific: dict[str, Any] | None = None
    # diskpipe's own facts for the policy (feature bits, extents, locators...)
    details: dict[str, Any] = NO_DETAILS
    allocated_size: int | None = None


class ImageInfo(NamedTuple):
    """Everything diskpipe knows about one image.

    `format` is the qemu-img driver to pass as `-f`; `disk_format` is Glance's
    name. `matches` lists every container format found (a header at offset 0,
    a VHD footer at the end); `contents` what lies inside raw data. Facts a
    stream cannot carry (`actual_size`, a dmg known by its file name, tables
    the stream had passed) are None in stream mode.
    """

    format: str
    disk_format: str
    virtual_size: int
    file_size: int
    filename: str | None = None
    actual_size: int | None = None
    cluster_size: int | None = None
    backing_file: str | None = None
    backing_file_format: str | None = None
    data_file: str | None = None
    encrypted: bool = False
    dirty: bool | None = False
    corrupt: bool = False
    subformat: str | None = None
    format_specific: dict[str, Any] | None = None
    details: dict[str, Any] = NO_DETAILS
    matches: tuple[str, ...] = ()
    contents: tuple[Content, ...] = ()
    allocated_size: int | None = None
    streamed: bool = False
    # Set when a stream could not decide (a structure lay behind its
    # position): why. Only the head's facts are then known.
    undecided: str | None = None

    def content_kinds(self) -> set[str]:
        return {content.kind for content in self.contents}

    def with_changes(self, **changes: Any) -> ImageInfo:
        return self._replace(**changes)

    def to_json(self) -> dict[str, Any]:
        """The `qemu-img info --output=json` keys plus diskpipe's own."""
        out: dict[str, Any] = {}
        if self.filename is not None:
            out["filename"] = self.filename
        out["format"] = self.format
        out["disk-format"] = self.disk_format
        out["virtual-size"] = self.virtual_size
        out["file-size"] = self.file_size
        if self.actual_size is not None:
            out["actual-size"] = self.actual_size
        if self.cluster_size is not None:
            out["cluster-size"] = self.cluster_size
        if self.backing_file is not None:
            out["backing-filename"] = self.backing_file
        if self.backing_file_format is not None:
            out["backing-filename-format"] = self.backing_file_format
        if self.data_file is not None:
            out["data-file"] = self.data_file
        if self.encrypted:
            out["encrypted"] = True
        if self.dirty is not None:
            out["dirty-flag"] = self.dirty
        if self.corrupt:
            out["corrupt"] = True
        if self.subformat is not None:
            out["subformat"] = self.subformat
        if self.format_specific is not None:
            out["format-specific"] = self.format_specific
        if self.allocated_size is not None:
            out["allocated-size"] = self.allocated_size
        out["matches"] = list(self.matches)
        out["contents"] = [content.to_json() for content in self.contents]
        if self.details:
            out["details"] = self.details
        if self.undecided is not None:
            out["undecided"] = self.undecided
        return out
