"""The pre-upload validation hook: `validate` for a file, `ValidatingReader`
around an upload stream. Importable without Celery or Ceph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from diskpipe.formats import FormatError, ImageInfo, StreamInspector, claim_prefix, inspect
from diskpipe.formats.detect import glance_disk_format
from diskpipe.formats.policy import Policy, Verdict, check, load_policy
from diskpipe.refusal import StreamUndecided, UnsafeImage, require_safe

__all__ = ["FormatError", "StreamUndecided", "UnsafeImage", "ValidatingReader", "validate"]

READ_CHUNK = 1024 * 1024


def validate(
    source: str | os.PathLike[str] | BinaryIO,
    claimed: str | None = None,
    policy: Policy | None = None,
) -> Verdict:
    """Inspect and judge an image at a path or in a file object.

    Allocation tables are read, so table checks (past the end, overlaps,
    over-claiming) run. Broken input raises `FormatError` (a ValueError).
    """
    info = inspect(source, allocation=True)
    return check(info, policy if policy is not None else load_policy(), claimed)


def provisional_info(inspector: StreamInspector) -> ImageInfo | None:
    """What the head of a stream already shows, for the head-decidable checks."""
    progress = inspector.progress
    if progress.head_matches is None or progress.contents is None:
        return None
    fmt = progress.head_matches[0] if progress.head_matches else "raw"
    return ImageInfo(
        format=fmt,
        disk_format=glance_disk_format(fmt, progress.contents),
        virtual_size=0,
        file_size=inspector.bytes_seen,
        matches=tuple(progress.head_matches),
        contents=tuple(progress.contents),
        streamed=True,
    )


# Heads that an import unpacks before judging (gzip, xz, bzip2, zstd; a tar's
# "ustar" at 257): a claim then describes the image inside, not these bytes.
_PACKED_STARTS = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh", b"\x28\xb5\x2f\xfd")
_TAR_MAGIC_OFFSET = 257
_TAR_HEAD = _TAR_MAGIC_OFFSET + 5


class HeadCheck:
    """What the first bytes of an upload decide, checked as they arrive: a
    claimed header refuted by its first bytes (claim_prefix), then the
    head-decidable policy checks once the stream inspector has seen its head.
    It feeds the inspector itself. Raises UnsafeImage. The one head check of `ValidatingReader` and of URL
    downloads.

    `unpacked_later`: the import unpacks compressed data and OVAs before
    judging them, so their heads are not judged against the claim here.
    """

    def __init__(
        self, inspector: StreamInspector, claimed: str | None, policy: Policy, *, unpacked_later: bool = False
    ) -> None:
        self._inspector = inspector
        self._claimed = claimed
        self._policy = policy
        self._unpacked_later = unpacked_later
        self._head_checked = False
        needed = claim_prefix.PREFIX_NEEDED
        self._prefix_needed = max(needed, _TAR_HEAD) if unpacked_later else needed
        # The first bytes, kept only while a claimed header may still be refuted.
        self._prefix: bytearray | None = bytearray() if claim_prefix.needs_header(claimed) else None

    def _packed(self) -> bool | None:
        """Whether the prefix is the head of data the import unpacks (None:
        too few bytes to tell)."""
        assert self._prefix is not None
        head = bytes(self._prefix)
        if any(head.startswith(start) for start in _PACKED_STARTS):
            return True
        if any(start.startswith(head) for start in _PACKED_STARTS) or len(head) < _TAR_HEAD:
            return None
        return head[_TAR_MAGIC_OFFSET:_TAR_HEAD] == b"ustar"

    def _check_prefix(self, chunk: bytes) -> None:
        if self._prefix is None:
            return
        self._prefix += chunk[: self._prefix_needed - len(self._prefix)]
        complete = len(self._prefix) >= self._prefix_needed
        if self._unpacked_later:
            packed = self._packed()
            if packed:
                self._prefix = None
                return
            if packed is None and not complete:
                return
        issue = claim_prefix.ruled_out(self._claimed, bytes(self._prefix[: claim_prefix.PREFIX_NEEDED]))
        if complete:
            self._prefix = None
        if issue is not None:
            require_safe(Verdict(safe=False, issues=(issue,)))

    def feed(self, chunk: bytes) -> None:
        """Feed `chunk` to the inspector and judge what is then known. The
        prefix goes first: a refuted claim is refused before the inspector
        can call the data malformed."""
        self._check_prefix(chunk)
        self._inspector.feed(chunk)
        if self._head_checked:
            return
        provisional = provisional_info(self._inspector)
        if provisional is None:
            return
        self._head_checked = True
        if self._unpacked_later and provisional.content_kinds() & {"compressed", "archive"}:
            return
        early = check(provisional, self._policy, self._claimed, final=False)
        if not early.safe:
            require_safe(early)


class ValidatingReader:
    """Passes an upload through unchanged while inspecting it.

    Wrap an iterator of byte chunks or a binary file-like object; iterate over
    the reader (or call `read`) to get the same bytes. As soon as the head of
    the data makes the verdict certain (a claim that cannot match, a format
    hidden in another, content that is no disk image...) `UnsafeImage` is
    raised, so an upload server can abort early; the full verdict comes at the
    end of the data (then `.verdict` holds it). Broken input raises
    `FormatError`; data whose tables come in an order a stream cannot follow
    raises `StreamUndecided` at the end (validate the stored file then). Memory held is bounded by the stream inspector's bound
    (about 1.2 MiB) plus the chunk in hand.
    """

    def __init__(
        self,
        upload: Iterable[bytes] | BinaryIO,
        claimed: str | None = None,
        policy: Policy | None = None,
        *,
        chunk_size: int = READ_CHUNK,
    ) -> None:
        self._policy = policy if policy is not None else load_policy()
        self._claimed = claimed
        self._inspector = StreamInspector(allocation=True)
        self._head = HeadCheck(self._inspector, claimed, self._policy)
        self._pending = b""
        self._chunks = self._iterate(upload, chunk_size)
        self.verdict: Verdict | None = None

    @property
    def bytes_seen(self) -> int:
        return self._inspector.bytes_seen

    @staticmethod
    def _iterate(upload: Iterable[bytes] | BinaryIO, chunk_size: int) -> Iterator[bytes]:
        read = getattr(upload, "read", None)
        if read is None:
            yield from upload  # type: ignore[misc]
            return
        while True:
            chunk = read(chunk_size)
            if not chunk:
                return
            yield chunk
            # Drop the reference before reading the next chunk, so only one
            # chunk is ever alive here.
            del chunk

    def _pass(self, chunk: bytes) -> bytes:
        self._head.feed(chunk)
        return chunk

    def _finish(self) -> Verdict:
        if self.verdict is None:
            info = self._inspector.finish()
            self.verdict = check(info, self._policy, self._claimed)
            require_safe(self.verdict)
        return self.verdict

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if chunk:
                checked = self._pass(bytes(chunk))
                del chunk
                yield checked
                del checked
        self._finish()

    def read(self, size: int = -1) -> bytes:
        """File-like reading; the verdict is checked when the data ends."""
        out = bytearray(self._pending)
        self._pending = b""
        while size < 0 or len(out) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._finish()
                break
            if chunk:
                out += self._pass(bytes(chunk))
        if size >= 0 and len(out) > size:
            self._pending = bytes(out[size:])
            del out[size:]
        return bytes(out)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ValidatingReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
