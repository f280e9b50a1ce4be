"""The management commands on stored images: delete, protect, cancel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diskpipe.converter.stores.base import ImageInUse, ImageNotFound, ImageProtected, StoreUnavailable
from diskpipe.jobs.errors import JobRefused, Transient
from diskpipe.jobs.records import RecordStore
from diskpipe.jobs.states import ACTIVE, CANCELLED, DELETED, FINAL, KILLED, QUEUED, SAVING, IllegalTransition

if TYPE_CHECKING:
    from diskpipe.jobs.pipeline import Environment


def delete_image(image_id: str, env: Environment) -> dict[str, Any]:
    """Delete a stored image: refused while protected or while it has clones."""
    records = env.records
    record = records.get(image_id)
    if record is None:
        raise KeyError(image_id)
    if record.get("protected"):
        raise JobRefused(f"image {image_id} is protected; unprotect it first")
    if record["status"] == SAVING:
        raise JobRefused(f"image {image_id} is being saved; cancel it first")
    if record["status"] == DELETED:
        return record
    try:
        env.store.delete(image_id)
    except ImageNotFound:
        pass
    except (ImageInUse, ImageProtected) as error:
        raise JobRefused(str(error)) from error
    except StoreUnavailable as error:
        raise Transient(str(error)) from error
    return records.transition(image_id, record["status"], DELETED, locations=[])


def set_protected(image_id: str, env: Environment, protected: bool) -> dict[str, Any]:
    """Protect an image (or lift it) in the record and, once stored, in the
    store itself, so a delete that bypasses diskpipe's records (another
    client of the pool or bucket going through diskpipe's store) is refused too."""
    record = env.records.get(image_id)
    if record is None:
        raise KeyError(image_id)
    if record["status"] == ACTIVE:
        try:
            env.store.protect(image_id, protected)
        except ImageNotFound:
            pass  # the record outlived its data: the record alone says it
        except StoreUnavailable as error:
            raise Transient(str(error)) from error
    return env.records.update(image_id, protected=protected)


def cancel_image(image_id: str, records: RecordStore) -> dict[str, Any]:
    """Ask the job to stop. A queued job is killed at once; a saving one stops
    at its next heartbeat (its worker kills qemu-img and removes the
    temporary image)."""
    record = records.get(image_id)
    if record is None:
        raise KeyError(image_id)
    if record["status"] in FINAL:
        return record
    records.request_cancel(image_id)
    if record["status"] == QUEUED:
        try:
            killed = records.transition(image_id, QUEUED, KILLED, outcome=CANCELLED, reason="cancelled")
            records.request_cancel(image_id, False)
            return killed
        except IllegalTransition:
            pass
    current = records.get(image_id)
    assert current is not None
    return current
