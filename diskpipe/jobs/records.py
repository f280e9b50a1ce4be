"""Job records: one per image id, with Glance's field names.

Two backends with one interface: Redis (what every worker and the CLI read
when a broker is configured) and SQLite (the embedded default, so `status`
and `list` work with no server). A status change is always a
compare-and-set checked against `states.LEGAL`; progress lives beside the
record and is written without touching the status.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from diskpipe.jobs.states import NEW, QUEUED, SAVING, IllegalTransition, StaleAttempt, check_transition


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_record(image_id: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": image_id,
        "name": fields.pop("name", None),
        "status": QUEUED,
        "disk_format": None,
        "container_format": "bare",
        "size": None,
        "virtual_size": None,
        "checksum": None,
        "os_hash_algo": None,
        "os_hash_value": None,
        "locations": [],
        "protected": False,
        "created_at": now(),
        "updated_at": now(),
        "attempts": 0,
        "reason": None,
    }
    record.update(fields)
    return record


class RecordStore(Protocol):
    def get(self, image_id: str) -> dict[str, Any] | None: ...

    def list(self) -> list[dict[str, Any]]: ...

    def create(self, record: dict[str, Any]) -> bool:
        """Insert a new queued record; False if the id exists."""
        ...

    def transition(
        self, image_id: str, expected: str, wanted: str, *, fence: int | None = None, **changes: Any
    ) -> dict[str, Any]:
        """Move from `expected` to `wanted` atomically, applying `changes`.
        Raises IllegalTransition (also when the status is not `expected`).
        With `fence` (the caller's attempt number), only while the record's
        `attempts` is still that number; else StaleAttempt."""
        ...

    def update(self, image_id: str, *, fence: int | None = None, **changes: Any) -> dict[str, Any]:
        """Change fields other than the status; with `fence`, only while the
        record's `attempts` is still that number, else StaleAttempt."""
        ...

    def set_progress(self, image_id: str, progress: dict[str, Any]) -> None: ...

    def get_progress(self, image_id: str) -> dict[str, Any] | None: ...

    def request_cancel(self, image_id: str, requested: bool = True) -> None:
        """Ask the job working on the image to stop (or withdraw the ask)."""
        ...

    def cancel_requested(self, image_id: str) -> bool: ...


def _merge(record: dict[str, Any], changes: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    merged = dict(record)
    merged.update(changes)
    if status is not None:
        merged["status"] = status
    merged["updated_at"] = now()
    return merged


class SqliteRecords:
    """Records in a local SQLite file (the embedded default)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, status TEXT NOT NULL, "
                "record TEXT NOT NULL, progress TEXT, cancel INTEGER NOT NULL DEFAULT 0)"
            )

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        yield db

    def get(self, image_id: str) -> dict[str, Any] | None:
        with self._connection() as db:
            row = db.execute("SELECT record FROM images WHERE id = ?", (image_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self) -> list[dict[str, Any]]:
        with self._connection() as db:
            rows = db.execute("SELECT record FROM images ORDER BY rowid").fetchall()
        return [json.loads(row[0]) for row in rows]

    def create(self, record: dict[str, Any]) -> bool:
        check_transition(record["id"], NEW, record["status"])
        with self._connection() as db:
            try:
                db.execute(
                    "INSERT INTO images (id, status, record) VALUES (?, ?, ?)",
                    (record["id"], record["status"], json.dumps(record)),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def transition(
        self, image_id: str, expected: str, wanted: str, *, fence: int | None = None, **changes: Any
    ) -> dict[str, Any]:
        check_transition(image_id, expected, wanted)
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT record FROM images WHERE id = ?", (image_id,)).fetchone()
                current = json.loads(row[0]) if row else None
                if current is None or current["status"] != expected:
                    raise IllegalTransition(image_id, current["status"] if current else NEW, wanted)
                _check_fence(image_id, current, fence, wanted)
                merged = _merge(current, changes, wanted)
                db.execute(
                    "UPDATE images SET status = ?, record = ? WHERE id = ?", (wanted, json.dumps(merged), image_id)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return merged

    def update(self, image_id: str, *, fence: int | None = None, **changes: Any) -> dict[str, Any]:
        if "status" in changes:
            raise ValueError("status changes go through transition()")
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT record FROM images WHERE id = ?", (image_id,)).fetchone()
                if row is None:
                    raise KeyError(image_id)
                current = json.loads(row[0])
                _check_fence(image_id, current, fence)
                merged = _merge(current, changes)
                db.execute("UPDATE images SET record = ? WHERE id = ?", (json.dumps(merged), image_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return merged

    def set_progress(self, image_id: str, progress: dict[str, Any]) -> None:
        with self._connection() as db:
            db.execute("UPDATE images SET progress = ? WHERE id = ?", (json.dumps(progress), image_id))

    def get_progress(self, image_id: str) -> dict[str, Any] | None:
        with self._connection() as db:
            row = db.execute("SELECT progress FROM images WHERE id = ?", (image_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def request_cancel(self, image_id: str, requested: bool = True) -> None:
        with self._connection() as db:
            db.execute("UPDATE images SET cancel = ? WHERE id = ?", (int(requested), image_id))

    def cancel_requested(self, image_id: str) -> bool:
        with self._connection() as db:
            row = db.execute("SELECT cancel FROM images WHERE id = ?", (image_id,)).fetchone()
        return bool(row and row[0])


# KEYS[1] record key, KEYS[2] index set; ARGV[1] expected status ('' = no
# record), ARGV[2] new record JSON, ARGV[3] image id, ARGV[4] the attempt
# number the record must still be at ('' = any). Returns the status found, or
# '=stale:<attempts>' when the record has moved on to another attempt.
_CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local status = ''
local record = nil
if current then
    record = cjson.decode(current)
    status = record['status']
end
if status ~= ARGV[1] then return status end
if ARGV[4] ~= '' and tostring(record['attempts']) ~= ARGV[4] then
    return '=stale:' .. tostring(record['attempts'])
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return '=ok'
"""


class RedisRecords:
    """Records in Redis, shared by every worker and the CLI."""

    PREFIX = "diskpipe:image:"
    PROGRESS_PREFIX = "diskpipe:progress:"
    CANCEL_PREFIX = "diskpipe:cancel:"
    INDEX = "diskpipe:images"

    def __init__(self, client: Any) -> None:
        self.redis = client
        self._cas = client.register_script(_CAS_SCRIPT)

    def get(self, image_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.PREFIX + image_id)
        return json.loads(raw) if raw else None

    def list(self) -> list[dict[str, Any]]:
        ids = sorted(
            member.decode() if isinstance(member, bytes) else member for member in self.redis.smembers(self.INDEX)
        )
        records = [self.get(image_id) for image_id in ids]
        found = [record for record in records if record is not None]
        return sorted(found, key=lambda record: (record.get("created_at") or "", record["id"]))

    def _swap(self, image_id: str, expected: str, record: dict[str, Any], fence: int | None = None) -> str:
        result = self._cas(
            keys=[self.PREFIX + image_id, self.INDEX],
            args=[expected, json.dumps(record), image_id, "" if fence is None else str(fence)],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    def create(self, record: dict[str, Any]) -> bool:
        check_transition(record["id"], NEW, record["status"])
        return self._swap(record["id"], NEW, record) == "=ok"

    def transition(
        self, image_id: str, expected: str, wanted: str, *, fence: int | None = None, **changes: Any
    ) -> dict[str, Any]:
        check_transition(image_id, expected, wanted)
        current = self.get(image_id)
        if current is None or current["status"] != expected:
            raise IllegalTransition(image_id, current["status"] if current else NEW, wanted)
        merged = _merge(current, changes, wanted)
        # The script checks the fence too: a takeover between the read above
        # and the swap keeps the status `saving` but changes `attempts`.
        found = self._swap(image_id, expected, merged, fence)
        if found.startswith("=stale:"):
            raise StaleAttempt(image_id, wanted, fence or 0, found.removeprefix("=stale:"))
        if found != "=ok":
            raise IllegalTransition(image_id, found, wanted)
        return merged

    def update(self, image_id: str, *, fence: int | None = None, **changes: Any) -> dict[str, Any]:
        if "status" in changes:
            raise ValueError("status changes go through transition()")
        from redis.exceptions import WatchError

        key = self.PREFIX + image_id
        while True:
            # An optimistic transaction: retried if the record changes meanwhile.
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise KeyError(image_id)
                    current = json.loads(raw)
                    _check_fence(image_id, current, fence)  # WATCH: a takeover meanwhile fails the EXEC
                    merged = _merge(current, changes)
                    pipe.multi()
                    pipe.set(key, json.dumps(merged))
                    pipe.execute()
                    return merged
                except WatchError:
                    continue

    def set_progress(self, image_id: str, progress: dict[str, Any]) -> None:
        self.redis.set(self.PROGRESS_PREFIX + image_id, json.dumps(progress), ex=7 * 24 * 3600)

    def get_progress(self, image_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.PROGRESS_PREFIX + image_id)
        return json.loads(raw) if raw else None

    def request_cancel(self, image_id: str, requested: bool = True) -> None:
        if requested:
            self.redis.set(self.CANCEL_PREFIX + image_id, "1", ex=7 * 24 * 3600)
        else:
            self.redis.delete(self.CANCEL_PREFIX + image_id)

    def cancel_requested(self, image_id: str) -> bool:
        return bool(self.redis.exists(self.CANCEL_PREFIX + image_id))


def _check_fence(image_id: str, current: dict[str, Any], fence: int | None, wanted: str = SAVING) -> None:
    """A write fenced by an attempt number goes through only while the record
    is still at that attempt (a delivery taken over writes nothing more)."""
    if fence is not None and current.get("attempts") != fence:
        raise StaleAttempt(image_id, wanted, fence, current.get("attempts"))
