"""The safety policy: facts in `ImageInfo` -> a `Verdict` (safe, issues, notes).

Every rule is a small named check returning zero or more `Issue`s; `check`
runs them all and fails closed (a check that raises yields the `internal`
issue). Check names are stable: operators filter on them and the samples
manifest records them. The same function serves `diskpipe info`,
`diskpipe validate`, the Python hook and the pipeline.
"""

from __future__ import annotations

from diskpipe.config import section
from diskpipe.formats.info import ImageInfo

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, NamedTuple
else:
    from diskpipe.formats.tuples import NamedTuple

TiB = 1 << 40
KiB = 1 << 10

# qemu drivers diskpipe converts from. bochs, cloop and dmg are left out on
# purpose: rarely used, rarely audited drivers that no cloud needs to accept.
DEFAULT_ALLOWED_FORMATS = frozenset({"raw", "qcow2", "qcow", "vpc", "vhdx", "vmdk", "vdi", "qed", "parallels", "luks"})
DEFAULT_VMDK_CREATE_TYPES = frozenset({"monolithicSparse", "streamOptimized"})

# Which check an inspector anomaly belongs to (see each format module).
ANOMALY_CHECKS = {
    "unsupported_version": "unsupported_version",
    "metadata_overlap": "table_overlap",
    "region_overlap": "table_overlap",
    "l1_past_eof": "table_past_eof",
    "refcount_table_past_eof": "table_past_eof",
    "allocation_past_eof": "table_past_eof",
    "gd_past_eof": "table_past_eof",
    "region_table_limits": "vhdx_tables",
    "metadata_table_limits": "vhdx_tables",
    "unknown_required_region": "vhdx_tables",
    "unknown_required_metadata": "vhdx_tables",
    "region_alignment": "vhdx_tables",
    "bat_too_small": "vhdx_tables",
    "log_length": "vhdx_tables",
    "pending_log": "vhdx_log",
    "descriptor_too_large": "vmdk_descriptor",
    "descriptor_offset": "vmdk_descriptor",
    "descriptor_as_file": "vmdk_descriptor",
    "descriptor_create_type": "vmdk_descriptor",
    "stream_footer": "vmdk_footer",
    "end_of_stream": "vmdk_footer",
}
DEFAULT_ANOMALY_CHECK = "header_sanity"

# Glance and qemu names an uploader may claim, and what each must fit.
CLAIM_ALIASES = {"vhd": "vpc", "ploop": "parallels"}
CONTAINER_CLAIMS = frozenset(
    {"qcow2", "qcow", "vpc", "vhdx", "vmdk", "vdi", "qed", "parallels", "luks", "bochs", "cloop", "dmg"}
)
RAW_FAMILY_CLAIMS = frozenset({"raw", "iso", "ami", "aki", "ari"})
NON_DISK_KINDS = frozenset({"compressed", "archive", "text", "other"})


@section("policy")
class Policy(NamedTuple):
    """The `[policy]` section of the configuration file."""

    allowed_formats: frozenset[str] = DEFAULT_ALLOWED_FORMATS
    vmdk_create_types: frozenset[str] = DEFAULT_VMDK_CREATE_TYPES
    max_virtual_size: int = 2 * TiB
    max_vmdk_descriptor: int = 64 * KiB
    allow_luks: bool = True
    allow_empty_image: bool = False


class Issue(NamedTuple):
    check: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "message": self.message}


class Verdict(NamedTuple):
    safe: bool
    issues: tuple[Issue, ...] = ()
    notes: tuple[str, ...] = ()
    info: ImageInfo | None = None
    # False: a stream could not decide (not a refusal, not safe either); the
    # notes say why, and only a check of the complete file can judge it.
    decided: bool = True

    @property
    def checks(self) -> list[str]:
        return sorted({issue.check for issue in self.issues})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "safe": self.safe,
            "issues": [issue.to_json() for issue in self.issues],
            "notes": list(self.notes),
        }
        if not self.decided:
            out["decided"] = False
        return out


class Context(NamedTuple):
    """What a check may consult besides the facts."""

    policy: Policy
    claimed: str | None
    # False while a stream is still arriving: only facts the head decides
    # are final (a fixed VHD or dmg trailer may still appear at the end).
    final: bool = True


if TYPE_CHECKING:
    Check = Callable[[ImageInfo, Context], Iterator[Issue]]
CHECKS: list[tuple[str, bool, Check]] = []  # (name, decidable from the head, function)


def _check(name: str, *, head: bool = False) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS.append((name, head, function))
        return function

    return register


def _anomalies(info: ImageInfo) -> list[dict[str, str]]:
    found: list[dict[str, str]] = list(info.details.get("anomalies", []))
    return found


@_check("anomalies")
def check_anomalies(info: ImageInfo, context: Context) -> Iterator[Issue]:
    """Structural problems the inspectors found (qemu refuses most of them)."""
    for anomaly in _anomalies(info):
        yield Issue(ANOMALY_CHECKS.get(anomaly["name"], DEFAULT_ANOMALY_CHECK), f"{info.format}: {anomaly['message']}")


@_check("backing_file")
def check_backing_file(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if info.backing_file is not None:
        target = info.backing_file or "(empty name)"
        yield Issue("backing_file", f"{info.format} image names a backing file: {target!r} (qemu would read it)")


@_check("data_file")
def check_data_file(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if info.data_file is not None or info.details.get("external-data-file"):
        name = info.data_file or "(given at open time)"
        yield Issue("data_file", f"qcow2 image keeps its data in an external file: {name!r}")


@_check("unknown_features")
def check_unknown_features(info: ImageInfo, context: Context) -> Iterator[Issue]:
    unknown = info.details.get("unknown-incompatible-features") or info.details.get("unknown-features")
    if unknown:
        yield Issue("unknown_features", f"{info.format} image sets unknown incompatible feature bits 0x{unknown:x}")


@_check("unsupported_version", head=True)
def check_version(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if info.format == "qcow":
        yield Issue("unsupported_version", "qcow version 1 images are not accepted (obsolete format; convert to qcow2)")


@_check("differencing_disk")
def check_differencing(info: ImageInfo, context: Context) -> Iterator[Issue]:
    parent = info.details.get("parent")
    if parent is not None and info.format in ("vpc", "vhdx", "vdi"):
        yield Issue("differencing_disk", f"{info.format} image is a differencing disk that names a parent image")


@_check("vmdk_create_type")
def check_vmdk_create_type(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if info.format != "vmdk":
        return
    create_type = info.details.get("create-type")
    if create_type not in context.policy.vmdk_create_types:
        allowed = ", ".join(sorted(context.policy.vmdk_create_types))
        yield Issue("vmdk_create_type", f"vmdk createType {create_type!r} is not allowed (allowed: {allowed})")


def _bad_extent_name(name: str) -> str | None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if "/" in name or "\\" in name:
        return "a path separator"
    if ".." in name:
        return "'..'"
    return None


@_check("vmdk_extents")
def check_vmdk_extents(info: ImageInfo, context: Context) -> Iterator[Issue]:
    descriptor = info.details.get("descriptor")
    if info.format != "vmdk" or not descriptor:
        return
    extents = descriptor.get("extents", [])
    if len(extents) > 1:
        yield Issue(
            "vmdk_extents",
            f"vmdk descriptor lists {len(extents)} extents (only a single self-contained extent is accepted)",
        )
    for extent in extents:
        problem = _bad_extent_name(extent["filename"])
        if problem:
            yield Issue("vmdk_extents", f"vmdk extent {extent['filename']!r} names {problem}")
    if info.details.get("text-descriptor") and extents:
        yield Issue("vmdk_extents", "vmdk text descriptor points at extent files outside the image")


@_check("vmdk_descriptor")
def check_vmdk_descriptor(info: ImageInfo, context: Context) -> Iterator[Issue]:
    descriptor = info.details.get("descriptor")
    if info.format != "vmdk" or not descriptor:
        return
    for line in descriptor.get("unexpected-lines", []):
        yield Issue(
            "vmdk_descriptor",
            f"vmdk descriptor has a line that is not a comment, key=value, ddb or extent line: {line!r}",
        )
    if descriptor.get("hidden-text"):
        yield Issue("vmdk_descriptor", "vmdk descriptor hides text after its NUL terminator")
    for disagreement in descriptor.get("disagreements", []):
        yield Issue("vmdk_descriptor", f"vmdk descriptor is ambiguous: {disagreement}")
    if descriptor.get("bytes", 0) > context.policy.max_vmdk_descriptor:
        yield Issue(
            "vmdk_descriptor",
            f"vmdk descriptor of {descriptor['bytes']} bytes exceeds {context.policy.max_vmdk_descriptor}",
        )
    embedded_type = descriptor.get("create-type")
    if not info.details.get("text-descriptor") and embedded_type not in (None, *DEFAULT_VMDK_CREATE_TYPES):
        yield Issue("vmdk_descriptor", f"embedded descriptor of a sparse extent claims createType {embedded_type!r}")


@_check("format_not_allowed", head=True)
def check_format_allowed(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if info.format not in context.policy.allowed_formats:
        yield Issue(
            "format_not_allowed",
            f"{info.format} images are refused by policy (a rarely used qemu driver; allowed: "
            f"{', '.join(sorted(context.policy.allowed_formats))})",
        )


@_check("multiple_formats", head=True)
def check_multiple_formats(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if len(info.matches) > 1:
        yield Issue("multiple_formats", f"the data matches several formats: {', '.join(info.matches)}")
    if info.matches and "iso" in info.content_kinds():
        yield Issue(
            "multiple_formats", f"a {info.matches[0]} header lies over an ISO volume (one format hidden inside another)"
        )


@_check("protective_mbr")
def check_protective_mbr(info: ImageInfo, context: Context) -> Iterator[Issue]:
    kinds = info.content_kinds()
    if "gpt" not in kinds or "iso" in kinds:
        return  # hybrid ISOs carry their own MBR layout next to the GPT
    gpt = next(content for content in info.contents if content.kind == "gpt")
    entries = gpt.details.get("mbr-entries")
    if entries is None:
        yield Issue("protective_mbr", "GPT disk without a protective MBR")
        return
    used = [entry for entry in entries if entry["type"] != 0]
    protective = [entry for entry in used if entry["type"] == 0xEE]
    if len(protective) != 1 or len(used) != 1:
        yield Issue(
            "protective_mbr", f"GPT's MBR should hold exactly one 0xEE partition, it holds {len(used)} partitions"
        )
        return
    entry = protective[0]
    if entry["start-lba"] != 1 or entry["start-chs"] != "000200":
        yield Issue("protective_mbr", "GPT's protective partition does not start at LBA 1 (CHS 00 02 00)")
    if any(candidate["status"] not in (0x00, 0x80) for candidate in entries):
        yield Issue("protective_mbr", "GPT's protective MBR has an invalid boot flag")


@_check("luks", head=True)
def check_luks(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if "luks" in info.content_kinds():
        version = next(content.name for content in info.contents if content.kind == "luks")
        yield Issue("luks_unsupported", f"{version} volumes are refused (qemu 7.2 opens only LUKS1)")
    if info.format == "luks" and not context.policy.allow_luks:
        yield Issue("luks_unsupported", "LUKS images are refused by policy")


@_check("not_a_disk_image", head=True)
def check_not_a_disk(info: ImageInfo, context: Context) -> Iterator[Issue]:
    for content in info.contents:
        if content.kind in NON_DISK_KINDS:
            inner = content.details.get("inner-formats")
            what = f"{content.kind} data ({content.name})" + (f" holding {', '.join(inner)}" if inner else "")
            yield Issue("not_a_disk_image", f"{what} is not a disk image; unpack it before uploading")


@_check("virtual_size")
def check_virtual_size(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if info.virtual_size > context.policy.max_virtual_size:
        yield Issue(
            "virtual_size",
            f"virtual size {info.virtual_size} exceeds the limit of {context.policy.max_virtual_size} bytes",
        )


@_check("empty_image")
def check_empty_image(info: ImageInfo, context: Context) -> Iterator[Issue]:
    """Nothing boots from a disk of zero bytes, yet Glance would store and
    serve it: an upload mistake (or a probe of the pipeline), not an image."""
    if info.virtual_size != 0 or context.policy.allow_empty_image:
        return
    what = "the file is empty" if info.file_size == 0 else f"{info.format} image of virtual size 0"
    yield Issue("empty_image", f"{what}: a disk of 0 bytes holds nothing to boot (allow_empty_image permits it)")


@_check("over_allocation")
def check_over_allocation(info: ImageInfo, context: Context) -> Iterator[Issue]:
    """Uncompressed allocation tables cannot map more data than the file holds."""
    if info.allocated_size is None or info.format == "raw":
        return
    compressing = info.details.get("compressed-clusters") or info.subformat == "streamOptimized"
    external = info.data_file is not None or info.details.get("external-data-file")
    if not compressing and not external and info.allocated_size > info.file_size:
        yield Issue(
            "over_allocation",
            f"{info.format} allocation tables map {info.allocated_size} bytes, the file holds only {info.file_size}",
        )


def _claim_fits(info: ImageInfo, claim: str, final: bool) -> bool | None:
    """True/False, or None when a stream has not yet shown enough to tell."""
    kinds = info.content_kinds()
    fixed_vhd = info.format == "vpc" and info.subformat == "fixed"
    if claim in CONTAINER_CLAIMS:
        if info.format == claim:
            return True
        # A fixed VHD footer or dmg trailer shows up only at the end of a stream.
        return None if not final and info.format == "raw" and claim in ("vpc", "dmg") else False
    if info.format != "raw" and not fixed_vhd:
        return False
    if fixed_vhd:
        return claim == "raw"
    return _raw_claim_fits(claim, kinds)


# What raw data must hold for a raw-family claim (raw itself: anything).
CLAIMED_CONTENT = {"iso": "iso", "aki": "kernel", "ari": "ramdisk"}


def _raw_claim_fits(claim: str, kinds: set[str]) -> bool:
    if claim in CLAIMED_CONTENT:
        return CLAIMED_CONTENT[claim] in kinds
    if claim == "ami":
        return not kinds & {"iso", "kernel", "ramdisk", *NON_DISK_KINDS}
    return claim == "raw"


@_check("claimed_format", head=True)
def check_claimed_format(info: ImageInfo, context: Context) -> Iterator[Issue]:
    if context.claimed is None:
        return
    claim = CLAIM_ALIASES.get(context.claimed.lower(), context.claimed.lower())
    if claim not in CONTAINER_CLAIMS and claim not in RAW_FAMILY_CLAIMS:
        yield Issue("claimed_format", f"claimed format {context.claimed!r} is not a known disk format")
        return
    fits = _claim_fits(info, claim, context.final)
    if fits is False:
        found = info.disk_format if info.format == "raw" else info.format
        yield Issue("claimed_format", f"claimed {context.claimed!r}, but the data is {found} ({info.format} to qemu)")


def _notes(info: ImageInfo) -> tuple[str, ...]:
    notes = []
    if info.format == "luks":
        notes.append("LUKS1: the encrypted payload cannot be inspected; converting it needs the key")
    if info.encrypted and info.format != "luks":
        notes.append(f"encrypted {info.format} image: its contents cannot be inspected; converting it needs the key")
    if info.streamed:
        notes.append("inspected as a stream: table checks that need the whole file run again on the stored file")
    return tuple(notes)


def check(info: ImageInfo, policy: Policy | None = None, claimed: str | None = None, *, final: bool = True) -> Verdict:
    """Judge the facts. With `final=False` (a stream's head only) just the
    checks the head decides run, and a safe answer means "not yet unsafe".
    Facts from a stream that could not decide (`info.undecided`) get the
    head's checks only: a refusal if they find one, else an undecided verdict."""
    undecided = info.undecided is not None
    final = final and not undecided
    context = Context(policy or Policy(), claimed, final)
    issues: list[Issue] = []
    for name, decidable_from_head, function in CHECKS:
        if not final and not decidable_from_head:
            continue
        try:
            issues.extend(function(info, context))
        except Exception as error:  # noqa: BLE001 - fail closed: a crashing check is a failed check
            issues.append(Issue("internal", f"check {name} failed: {type(error).__name__}: {error}"))
    if undecided and not issues:
        note = f"stream could not decide: {info.undecided}; only a check of the complete file can judge it"
        return Verdict(safe=False, notes=(note,), info=info, decided=False)
    return Verdict(safe=not issues, issues=tuple(issues), notes=_notes(info) if final else (), info=info)


def load_policy(path: str | None = None, **overrides: Any) -> Policy:
    """The `[policy]` section of the configuration file (or of `path`)."""
    from diskpipe.config import load

    return load(Policy, path, **overrides)
