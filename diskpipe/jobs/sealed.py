"""What a delivery records about the image it sealed, and how a later
delivery adopts an image whose delivery died after storing it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from diskpipe.converter.checksums import Checksums, hash_image
from diskpipe.converter.convert import ConversionFailed, ConvertResult
from diskpipe.formats.api import inspect_reader
from diskpipe.jobs.endings import remove_if_still_ours
from diskpipe.jobs.states import ACTIVE, OUTCOME_ACTIVE, SAVING

if TYPE_CHECKING:
    from diskpipe.formats import ImageInfo
    from diskpipe.jobs.pipeline import Environment, ImportJob


log = logging.getLogger(__name__)


def record_fields(result: ConvertResult) -> dict[str, Any]:
    fields = result.to_json()
    fields.pop("status", None)
    fields.pop("id", None)
    fields["sealed_checksums"] = None  # recorded now under Glance's keys
    return fields


def sealed_fields(checksums: Checksums) -> dict[str, Any]:
    """What a delivery records before renaming the sealed image (see adopt_stored)."""
    return {"size": checksums.size, "md5": checksums.md5, "sha512": checksums.sha512, "sparse": checksums.sparse}


def adopt_stored(job: ImportJob, env: Environment, record: dict[str, Any], fence: int) -> dict[str, Any] | None:
    """Record an image a dead delivery finalized; None when the stored image
    is not the one that delivery sealed (it is removed, to be converted again).

    Before renaming, that delivery recorded the checksums it read from the
    sealed image (`sealed_checksums`); the lease kept any other delivery from
    storing under this id since, and a killed attempt's values are cleared
    when a new one starts. So the stored image is the one those values were
    read from: its format and size are checked (a few small reads) and its
    data is hashed again only when a value the job asks for is missing."""
    image = env.store.open_image(job.image_id)
    try:
        size = image.stored_size()
        sealed = record.get("sealed_checksums")
        sealed_size = sealed.get("size") if isinstance(sealed, dict) else size
        found = _checked_and_hashed(image, size, record, job) if sealed_size == size else None
    finally:
        image.close()
    if found is None:
        # Not the image its delivery sealed (one that failed verify and could
        # not be removed then): never adopted; removed under this delivery's
        # lease and fence, and converted again.
        log.warning(
            "image %s: %d bytes stored, not the %s sealed: converting it again", job.image_id, size, sealed_size
        )
        remove_if_still_ours(env, job.image_id, fence, None)  # under this delivery's lease
        return None
    stored, sums = found
    location = env.store.location(job.image_id)
    fields: dict[str, Any] = {
        "disk_format": job.to_format,
        "container_format": "bare",
        "virtual_size": stored.virtual_size,
        "locations": [{"url": location.url, "metadata": location.metadata}],
        "sealed_checksums": None,
        **sums.glance_properties(include_sparse=job.sparse_hash),
    }
    return env.records.transition(
        job.image_id, SAVING, ACTIVE, fence=fence, outcome=OUTCOME_ACTIVE, reason=None, retry=None, **fields
    )


def _checked_and_hashed(image: Any, size: int, record: dict[str, Any], job: ImportJob) -> tuple[ImageInfo, Checksums]:
    """The stored image's format (raw when the job converts to raw) and its
    checksums: the recorded ones when complete for the job, else hashed."""
    stored = inspect_reader(image.read_at, size)
    if stored.format != "raw" and job.to_format == "raw":
        raise ConversionFailed("stored image is not raw")
    sums = recorded_checksums(record, size, job)
    if sums is None:
        sums = hash_image(size, list(image.extents()), image.read_at, full=job.full_hashes, sparse=job.sparse_hash)
    return stored, sums


def recorded_checksums(record: dict[str, Any], size: int, job: ImportJob) -> Checksums | None:
    """The sealed image's checksums as its delivery recorded them, if they
    are complete for `job` and of an image of `size` bytes."""
    sealed = record.get("sealed_checksums")
    if not isinstance(sealed, dict) or sealed.get("size") != size:
        return None
    sums = Checksums(size=size, md5=sealed.get("md5"), sha512=sealed.get("sha512"), sparse=sealed.get("sparse"))
    if job.full_hashes and (sums.md5 is None or sums.sha512 is None):
        return None
    if job.sparse_hash and sums.sparse is None:
        return None
    return sums
