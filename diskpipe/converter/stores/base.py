"""The store interface.

A conversion writes into a *target*: a temporary image under a name no
reader looks at (`<id>.tmp.<owner>`), which `finalize` turns into the real
image in one atomic step (rename; for RBD also snapshot + protect first) and
`abort` removes (an object store's temporary is an unfinished multipart
upload, invisible until completed). So a failed or killed conversion never leaves a half image
under the real name, and `cleanup` finds what a dead owner left behind.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from diskpipe.converter.checksums import Extent
from diskpipe.converter.qemu_img import CancelToken, TargetSpec

TMP_MARKER = ".tmp."
# An image id becomes a file name and an RBD image name inside qemu's
# `rbd:pool/name:opt=...` syntax, so it keeps to characters none of those
# give a meaning (no `/`, `:`, `@`, `\`, `,`, no leading dot or dash).
IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidImageId(ValueError):
    """An image id diskpipe will not use as a name: a usage error."""


def check_image_id(image_id: str) -> str:
    """Return `image_id` if it is safe as a file and RBD image name, else
    raise InvalidImageId. The one place ids are checked."""
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise InvalidImageId(
            f"invalid image id {image_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if ".." in image_id or TMP_MARKER in image_id:
        # `..` reads as a parent directory; `.tmp.` would make the id look
        # like another image's temporary to purge and cleanup.
        raise InvalidImageId(f"invalid image id {image_id!r}: it may not contain '..' or {TMP_MARKER!r}")
    return image_id


def is_image_id(name: str) -> bool:
    """Whether `check_image_id` takes `name` (for names read from a store)."""
    try:
        check_image_id(name)
    except InvalidImageId:
        return False
    return True


class StoreError(RuntimeError):
    """The store refused an operation (exists, in use, not found...)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (Ceph down, directory missing): transient."""


class StoreMisconfigured(StoreError):
    """The store is set up wrongly (a missing ceph.conf or keyring, a user
    Ceph does not know, a directory diskpipe may not write): an operator must
    fix it; retrying will not help."""


class ImageInUse(StoreError):
    """The image has clones (RBD children) and cannot be deleted."""


class ImageExists(StoreError):
    """An image with that id is already stored."""


class ImageNotFound(StoreError):
    """No image with that id is stored."""


class ImageProtected(StoreError):
    """The image is protected in the store and cannot be deleted."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a store can do; the converter asks these, never a store's name."""

    # True: qemu-img writes the stored image itself (a file, an RBD image).
    # False: qemu-img writes a staged raw file that the store uploads
    # (object stores: S3 has no random writes).
    writes_directly: bool
    # Output formats the store keeps (RBD and S3: raw only, for Ceph clones
    # and for Nova, which boots raw from them).
    keeps_formats: frozenset[str]
    # qemu-img's target is a local file, so its size can be capped with
    # RLIMIT_FSIZE (a hostile image cannot fill the disk).
    local_target: bool
    # True: once sealed, reads come from a frozen copy (RBD's protected
    # snapshot), so the stored image is hashed after the seal. False: the
    # seal leaves what is read alone (a file's fsync, S3's upload of the
    # staged file), so the hashing runs beside it.
    hashes_after_seal: bool = False


def owner_tag() -> str:
    """Who writes a temporary image: `host-key-pid`, so a cleanup pass can
    tell a live writer from a dead one. The short host name is for people;
    the key (see `_namespace_key`) says where the pid means something."""
    return f"{_short_host()}-{_namespace_key()}-{os.getpid()}"


def _short_host() -> str:
    return socket.gethostname().split(".")[0]


@functools.cache
def _namespace_key() -> str:
    """Eight hex digits naming this kernel boot and this pid namespace.

    Host name and pid alone do not name a process: cloned VMs keep the host
    name of their image (and services started alike at boot get the same
    pids), containers sharing the host's name each count pids from 1. Two
    such writers would take each other's temporary for their own, and a
    cleanup on one would find the other's pid "dead" and remove its live
    image. A pid is checked only where boot and pid namespace are ours.
    Where either cannot be read (not Linux, a locked-down /proc), the key is
    this process's own: no other process's pid is then judged from here,
    its temporaries go by age.
    """
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return secrets.token_hex(4)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


MAX_PID = 1 << 22  # Linux's pid_max limit
OWNER = re.compile(r"(?P<host>.*)-(?P<key>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})")
# What diskpipe wrote before the key: host-pid.
OLD_OWNER = re.compile(r"(?P<host>.+)-(?P<pid>[0-9]{1,10})")


def _pid_alive(pid: int) -> bool | None:
    """Whether process `pid` of this pid namespace lives; None for a number
    no process has (0 would ask about our own process group)."""
    if not 0 < pid <= MAX_PID:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(tag: str) -> bool | None:
    """True/False for an owner whose pid this process can check (same boot
    and pid namespace: the key; the host name is only for people, it may
    change at run time); None when it cannot tell: another host's, or a tag
    in no form we write: judge by age. An older diskpipe's `host-pid` of
    this host name whose pid lives counts as alive (it may be that writer,
    still running during an upgrade), and as unknown otherwise."""
    match = OWNER.fullmatch(tag)
    if match is not None:
        return _pid_alive(int(match["pid"])) if match["key"] == _namespace_key() else None
    old = OLD_OWNER.fullmatch(tag)
    if old is not None and old["host"] == _short_host() and _pid_alive(int(old["pid"])):
        return True
    return None


def tmp_name(image_id: str, owner: str) -> str:
    return f"{image_id}{TMP_MARKER}{owner}"


def split_tmp_name(name: str) -> tuple[str, str] | None:
    """(image id, owner) of a temporary's name; None for a name that is not
    a temporary of a valid image id (not ours: left alone). The id is
    compared whole, never as a prefix: image `a`'s temporaries are not
    image `a.tmp`'s (`a.tmp.tmp.<owner>`)."""
    image_id, marker, owner = name.rpartition(TMP_MARKER)
    return (image_id, owner) if marker and is_image_id(image_id) else None


def is_tmp_of(name: str, image_id: str) -> bool:
    temporary = split_tmp_name(name)
    return temporary is not None and temporary[0] == image_id


# A temporary whose writer cannot be asked (another host's, one from before a
# reboot) is removed by `cleanup` once this old: a day, far longer than any
# conversion, short enough that a crashed host's leftovers do not pile up.
STALE_AFTER = 24 * 3600


@dataclass(frozen=True, slots=True)
class Leftover:
    """A temporary a cleanup pass found abandoned: removed, or kept and why."""

    name: str
    removed: bool
    why: str = ""  # why it could not be removed (and when to try again)

    def __str__(self) -> str:
        return f"removed {self.name}" if self.removed else f"could not remove {self.name}: {self.why}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "removed": self.removed, **({"why": self.why} if self.why else {})}


@dataclass(frozen=True, slots=True)
class Location:
    url: str  # file:///..., rbd://<fsid>/<pool>/<image>/snap or s3://<bucket>/<key>
    store: str
    metadata: dict[str, Any] = field(default_factory=dict)


class Target(Protocol):
    """A temporary image being written."""

    image_id: str
    name: str  # the temporary name
    size: int

    def qemu_target(self) -> TargetSpec:
        """What qemu-img convert writes to (a descriptor or a store-built name)."""
        ...

    def extents(self) -> Iterator[Extent]:
        """(offset, length, holds data) of what was written, in order."""
        ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def stored_size(self) -> int:
        """Bytes of the stored image (the virtual size for raw)."""
        ...

    def write_at(self, offset: int, data: bytes) -> None: ...

    def close(self) -> None: ...


class Store(Protocol):
    """What every store does. `name` is its kind (`file`, `rbd`, `s3`), for
    records and messages only: behaviour follows `capabilities`."""

    name: str
    capabilities: Capabilities

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> Target:
        """Create an empty temporary image of `size` bytes (or let qemu create it)."""
        ...

    # Targets are typed loosely: each store takes back only its own kind.
    def seal(self, target: Any, cancel: CancelToken | None = None) -> None:
        """Freeze the written data (file: fsync; RBD: snapshot + protect;
        S3: upload the parts). It only reads the image, so it may run while
        the data is re-inspected; finalize seals a target that is not sealed
        yet. A seal that takes long (S3's upload of every part) stops soon
        after `cancel` is set, raising Cancelled; short ones run to their end."""
        ...

    def finalize(self, target: Any) -> Location:
        """Make the temporary image the real one, atomically."""
        ...

    def abort(self, target: Any) -> None:
        """Remove the temporary image; never fails on one already gone."""
        ...

    def exists(self, image_id: str) -> bool: ...

    def location(self, image_id: str) -> Location: ...

    def open_image(self, image_id: str) -> Target:
        """The stored image, opened for reading (verification)."""
        ...

    def delete(self, image_id: str) -> None:
        """Remove the stored image; ImageProtected while it is protected,
        ImageInUse while it has clones, ImageNotFound when it is not there."""
        ...

    def protect(self, image_id: str, protected: bool = True) -> None:
        """Mark the stored image protected (delete refuses it) or not."""
        ...

    def is_protected(self, image_id: str) -> bool: ...

    def purge_temporaries(self, image_id: str) -> list[str]:
        """Remove every temporary of `image_id`, whoever wrote it (the caller
        holds the image's lease, so none of them is live); return their names."""
        ...

    def cleanup(self, is_live: Callable[[str, str], bool | None] | None = None) -> list[Leftover]:
        """Remove temporary images whose writer is gone; name each one, and
        say why one could not be removed (the others are removed anyway).
        `is_live(image_id, owner)` may decide (True/False) or defer (None)."""
        ...
