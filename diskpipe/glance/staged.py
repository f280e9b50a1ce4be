"""What the Glance plugin does to a staged image, with no Glance in sight:
inspect it, judge it against the claimed `disk_format`, and convert it (or
hand it on as it is) — or refuse it, naming every failed check.

The converted file is written next to the staged one, in Glance's staging
directory, as `<image id>.diskpipe.<format>` (a name no other plugin uses), so
that Glance's own clean-up of the import (`_DeleteFromFS`) removes it once it
is stored.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from diskpipe.glance.parts import (
    CancelToken,
    ConversionFailed,
    ConvertRequest,
    FileStore,
    FileTarget,
    FormatError,
    ImageInfo,
    Issue,
    Location,
    Policy,
    StoreError,
    Verdict,
    __version__,
    check,
    convert_image,
    inspect_fd,
    open_source,
    refuse,
    require_safe,
)

OUTPUT_FORMATS = ("raw", "qcow2")
# Raw-family claims that describe what raw data holds: Nova boots an `iso` as
# a CD and uses `aki`/`ari` as kernel and ramdisk, so the data (raw already)
# and the claim are kept; converting or renaming them would change their use.
KEPT_AS_UPLOADED = frozenset({"iso", "aki", "ari", "ami"})
OUTPUT_MARK = ".diskpipe"
# Every image property the plugin sets (a revert removes exactly these).
PROPERTY_NAMES = (
    "diskpipe_source_format",
    "diskpipe_source_disk_format",
    "diskpipe_checks",
    "diskpipe_notes",
    "diskpipe_version",
)
# Glance keeps a task message as text of any length; an operator reads it in
# `glance task-show`. Past this length each issue's message is shortened,
# never dropped: every failed check stays named.
MESSAGE_LIMIT = 4000
PROPERTY_LIMIT = 255  # Glance's API limit for the values it validates


class StagingStore(FileStore):
    """diskpipe's file store without its fsyncs, for the converted file in
    Glance's staging directory: a temporary that Glance copies into its own
    store at once and then removes. After a crash the import is lost either
    way, so making the file durable first would only cost time (the data's
    write-back, a large part of a conversion's time on a slow disk)."""

    def seal(self, target: FileTarget, cancel: CancelToken | None = None) -> None:
        """Nothing to make durable (see the class)."""

    def finalize(self, target: FileTarget) -> Location:
        target.close()
        # The import holds Glance's lock on the image and leftovers are
        # removed first: the final name is free, a rename suffices.
        os.rename(target.path, target.final_path)
        return self.location(target.image_id)


@dataclass(frozen=True, slots=True)
class Settings:
    """The `[diskpipe]` section of glance-image-import.conf, resolved."""

    policy: Policy
    output_format: str = "raw"
    convert_timeout: float | None = None  # None: scaled by virtual size (diskpipe's default)


class ImportFailed(Exception):
    """The import failed for a reason other than a refused image (setup,
    disk space, qemu-img failing on data the policy accepted)."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """What Glance stores: `path` (the converted file, or the staged file
    itself when `converted` is False) and the image's new attributes."""

    path: str
    converted: bool
    disk_format: str
    container_format: str
    virtual_size: int
    size: int
    properties: dict[str, str]


def refusal_message(issues: tuple[Issue, ...]) -> str:
    """One line naming every failed check with its reason."""
    parts = [f"{issue.check}: {issue.message}" for issue in issues]
    text = "diskpipe refused the image: " + "; ".join(parts)
    if len(text) <= MESSAGE_LIMIT:
        return text
    share = max(40, MESSAGE_LIMIT // max(1, len(parts)) - 20)
    shortened = [part if len(part) <= share else part[: share - 1] + "…" for part in parts]
    return "diskpipe refused the image: " + "; ".join(shortened)


def output_path(staged: str, image_id: str, output_format: str) -> Path:
    return Path(staged).parent / f"{image_id}{OUTPUT_MARK}.{output_format}"


def remove_outputs(staged: str, image_id: str) -> None:
    """Remove what a conversion of this image wrote next to the staged file
    (the finished file and any temporary), whoever's attempt left it."""
    directory = Path(staged).parent
    for output_format in OUTPUT_FORMATS:
        output_path(staged, image_id, output_format).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        FileStore(directory).purge_temporaries(f"{image_id}{OUTPUT_MARK}")


def keeps_data(info: ImageInfo, claimed: str, output_format: str) -> bool:
    """True when the staged data is stored as uploaded: raw data under a
    raw-family claim, or raw data when raw is wanted (a copy would only cost
    time)."""
    return info.format == "raw" and (claimed.lower() in KEPT_AS_UPLOADED or output_format == "raw")


def found_properties(info: ImageInfo, verdict: Verdict) -> dict[str, str]:
    """Image properties recording what diskpipe found."""
    found = {
        "diskpipe_source_format": info.format,
        "diskpipe_source_disk_format": info.disk_format,
        "diskpipe_checks": "passed",
        "diskpipe_version": __version__,
    }
    if verdict.notes:
        notes = "; ".join(verdict.notes)
        found["diskpipe_notes"] = notes if len(notes) <= PROPERTY_LIMIT else notes[: PROPERTY_LIMIT - 1] + "…"
    return found


def judge(fd: int, claimed: str, policy: Policy) -> tuple[ImageInfo, Verdict]:
    """Inspect the open staged file and judge it; UnsafeImage (diskpipe's one
    refusal) if unsafe."""
    try:
        info = inspect_fd(fd, allocation=True)
    except FormatError as error:
        raise refuse("malformed", str(error)) from error
    return info, require_safe(check(info, policy, claimed))


def process(staged: str, image_id: str, claimed: str, container_format: str, settings: Settings) -> Accepted:
    """Judge the staged file and produce what Glance should store.

    Raises UnsafeImage (the image is unsafe, malformed, or qemu-img reads
    it differently from the inspector) or ImportFailed (anything else).
    """
    if settings.output_format not in OUTPUT_FORMATS:
        raise ImportFailed(f"[diskpipe] output_format {settings.output_format!r} is not one of {OUTPUT_FORMATS}")
    try:
        fd = open_source(staged)
    except OSError as error:
        raise ImportFailed(f"cannot open the staged data: {error.strerror or error}") from error
    try:
        info, verdict = judge(fd, claimed, settings.policy)
        if keeps_data(info, claimed, settings.output_format):
            # Glance's rule for raw data: its virtual size is its byte count
            # (Glance itself sets that when it stores a bare raw image; qemu
            # would round a file that is no multiple of 512 up).
            return Accepted(
                path=staged,
                converted=False,
                disk_format=claimed,
                container_format=container_format,
                virtual_size=info.file_size,
                size=info.file_size,
                properties=found_properties(info, verdict),
            )
        return _convert(staged, fd, info, verdict, image_id, claimed, settings)
    finally:
        os.close(fd)


def _convert(
    staged: str, fd: int, info: ImageInfo, verdict: Verdict, image_id: str, claimed: str, settings: Settings
) -> Accepted:
    """Convert the inspected image (its descriptor, its inspected format)
    into the staging directory."""
    remove_outputs(staged, image_id)  # a crashed earlier attempt's (Glance's lock makes it ours)
    try:
        request = ConvertRequest(
            source=staged,
            image_id=f"{image_id}{OUTPUT_MARK}",
            to_format=settings.output_format,
            claimed=claimed,
            policy=settings.policy,
            full_hashes=False,  # Glance hashes the data itself as it stores it
            timeout=settings.convert_timeout,
            source_fd=fd,
        )
        result = convert_image(request, StagingStore(Path(staged).parent), inspected=info)
    except ConversionFailed as error:
        raise ImportFailed(f"the conversion failed: {error}") from error
    except (StoreError, OSError, ValueError) as error:
        raise ImportFailed(f"cannot write the converted image: {error}") from error
    return Accepted(
        path=str(result.location.metadata["path"]),
        converted=True,
        disk_format=settings.output_format,
        container_format="bare",
        virtual_size=result.virtual_size,
        size=result.checksums.size,
        properties=found_properties(info, verdict),
    )
