"""The RBD store: images in a Ceph pool, the way Glance, Nova and Cinder
expect them.

Image named by the image id, format 2 with layering (plus exclusive-lock,
object-map, fast-diff, deep-flatten: Ceph's defaults, which make `rbd du`
and diffs cheap); thin (qemu-img skips zero regions, and a stream write
skips all-zero blocks); a protected snapshot `snap` so clones can be made;
location `rbd://<fsid>/<pool>/<image>/snap`.

Writes go to `<id>.tmp.<owner>`; `finalize` snapshots and protects the
temporary image and then renames it, so the real name only ever appears
complete. librados waits minutes (or forever) by default when the cluster
is unreachable: every connection, and every qemu-img `rbd:` target, gets
the `[rbd]` section's timeouts so such a failure is a clear error in
seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from diskpipe.config import section
from diskpipe.converter.checksums import Extent
from diskpipe.converter.qemu_img import TargetSpec
from diskpipe.converter.stores.base import (
    TMP_MARKER,
    Capabilities,
    ImageExists,
    ImageInUse,
    ImageNotFound,
    ImageProtected,
    Location,
    StoreError,
    StoreUnavailable,
    check_image_id,
    owner_alive,
    owner_tag,
    tmp_name,
)

log = logging.getLogger(__name__)
SNAPSHOT = "snap"
# layering | exclusive-lock | object-map | fast-diff | deep-flatten
FEATURES = 1 | 4 | 8 | 16 | 32
OWNER_KEY = "diskpipe.owner"
CREATED_KEY = "diskpipe.created"
# Set on a stored image that `delete` must refuse (the snapshot is protected
# anyway, for clones: this is the operator's "keep it" mark).
PROTECTED_KEY = "diskpipe.protected"


@section("rbd")
@dataclass(frozen=True, slots=True)
class RbdConfig:
    """The `[rbd]` section of the configuration file."""

    pool: str = "rbd"
    user: str = "admin"  # the client id, without "client."
    conf: str | None = None  # default: $CEPH_CONF, else /etc/ceph/ceph.conf
    keyring: str | None = None
    connect_timeout: int = 10  # client_mount_timeout, seconds
    op_timeout: int = 30  # rados_mon_op_timeout and rados_osd_op_timeout, seconds
    stale_after: int = 24 * 3600  # another host's leftovers are removed after this many seconds

    def conf_path(self) -> str:
        return self.conf or os.environ.get("CEPH_CONF") or "/etc/ceph/ceph.conf"

    def client_options(self) -> dict[str, str]:
        options = {
            "client_mount_timeout": str(self.connect_timeout),
            "rados_mon_op_timeout": str(self.op_timeout),
            "rados_osd_op_timeout": str(self.op_timeout),
        }
        if self.keyring:
            options["keyring"] = self.keyring
        return options


def _escape(value: str) -> str:
    """qemu's rbd: filename syntax separates options with ':' and takes a
    backslash to escape the next character."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("@", "\\@")


def qemu_rbd_target(config: RbdConfig, image: str) -> str:
    """The `rbd:` filename qemu-img writes to, with auth and timeouts."""
    parts = [
        f"rbd:{_escape(config.pool)}/{_escape(image)}",
        f"id={_escape(config.user)}",
        f"conf={_escape(config.conf_path())}",
    ]
    parts += [f"{key}={_escape(value)}" for key, value in config.client_options().items()]
    return ":".join(parts)


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as error:
        raise StoreUnavailable(
            "the Ceph Python bindings are missing: apt-get install python3-rados python3-rbd "
            "(scripts/setup.sh links them into the virtualenv)"
        ) from error
    return rados, rbd


class RbdTarget:
    """An image being written, or (from `open_image`) a stored one.

    Once sealed, reads come from the protected snapshot, opened read-only:
    the bytes clones and downloads are served from, which no client can
    change any more, so what is hashed after sealing is what is stored.
    """

    def __init__(self, store: RbdStore, image_id: str, name: str, size: int, *, sealed: bool = False) -> None:
        self.store = store
        self.image_id = image_id
        self.name = name
        self.size = size
        self.sealed = sealed
        self._image: Any = None
        self._image_is_snapshot = False

    def qemu_target(self) -> TargetSpec:
        return TargetSpec.rbd(qemu_rbd_target(self.store.config, self.name))

    def _open(self) -> Any:
        if self._image is not None and self._image_is_snapshot != self.sealed:
            self.close()  # sealed since it was opened: read the snapshot from now on
        if self._image is None:
            snapshot = SNAPSHOT if self.sealed else None
            self._image = self.store.open_raw(self.name, snapshot=snapshot)
            self._image_is_snapshot = self.sealed
        return self._image

    def extents(self) -> Iterator[Extent]:
        """The objects that hold data, whole. whole_object=True answers from
        the object map (fast-diff) without touching an object; a per-object
        listing costs a round per object of the virtual size (16 s for an
        empty TiB). Reading whole objects reads their zeros too, which hash
        as zeros: the digests are the same."""
        found: list[Extent] = []
        self._open().diff_iterate(
            0,
            self.size,
            None,
            lambda offset, length, exists: found.append((offset, length, bool(exists))),
            whole_object=True,
        )
        yield from sorted(found)

    def read_at(self, offset: int, length: int) -> bytes:
        data: bytes = self._open().read(offset, length)
        return data

    def write_at(self, offset: int, data: bytes) -> None:
        self._open().write(data, offset)

    def stored_size(self) -> int:
        size: int = self._open().size()
        return size

    def close(self) -> None:
        if self._image is not None:
            self._image.close()
            self._image = None


class RbdStore:
    name = "rbd"
    capabilities = Capabilities(writes_directly=True, keeps_formats=frozenset({"raw"}), local_target=False)

    def __init__(self, config: RbdConfig | None = None) -> None:
        self.config = config or RbdConfig()
        self._cluster: Any = None
        self._ioctx: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # -- connection -----------------------------------------------------------
    def _connect(self) -> Any:
        """One cluster handle per process (a forked worker makes its own)."""
        with self._lock:
            if self._ioctx is not None and self._pid == os.getpid():
                return self._ioctx
            rados, _ = _bindings()
            self._pid = os.getpid()
            try:
                cluster = rados.Rados(
                    conffile=self.config.conf_path(), rados_id=self.config.user, conf=self.config.client_options()
                )
                cluster.connect(timeout=self.config.connect_timeout)
                ioctx = cluster.open_ioctx(self.config.pool)
            except rados.ObjectNotFound as error:
                raise StoreError(f"RBD pool {self.config.pool!r} does not exist") from error
            except (rados.Error, OSError) as error:
                raise StoreUnavailable(
                    f"Ceph is unreachable ({self.config.conf_path()}, user {self.config.user}): {error}"
                ) from error
            self._cluster, self._ioctx = cluster, ioctx
            return ioctx

    def close(self) -> None:
        with self._lock:
            if self._ioctx is not None:
                self._ioctx.close()
            if self._cluster is not None:
                self._cluster.shutdown()
            self._ioctx = self._cluster = None

    def fsid(self) -> str:
        self._connect()
        return str(self._cluster.get_fsid())

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a librbd call, turning cluster trouble into StoreUnavailable."""
        rados, rbd = _bindings()
        try:
            return function(*args, **kwargs)
        except rbd.ImageNotFound as error:
            raise ImageNotFound(str(error)) from error
        except rbd.ImageExists as error:
            raise ImageExists(str(error)) from error
        except (rbd.Timeout, rados.TimedOut, rados.ConnectionShutdown) as error:
            raise StoreUnavailable(f"Ceph did not answer: {error}") from error

    def open_raw(self, name: str, *, snapshot: str | None = None) -> Any:
        """An image handle; with `snapshot`, that snapshot, read-only."""
        _, rbd = _bindings()
        if snapshot is None:
            return self._call(rbd.Image, self._connect(), name)
        return self._call(rbd.Image, self._connect(), name, snapshot=snapshot, read_only=True)

    # -- the Store interface --------------------------------------------------
    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> RbdTarget:
        if image_format != "raw":
            raise StoreError("the RBD store keeps raw images only (Ceph clones copy-on-write only from raw)")
        check_image_id(image_id)  # it becomes part of qemu's `rbd:pool/name:...` filename
        _, rbd = _bindings()
        ioctx = self._connect()
        if self.exists(image_id):
            raise ImageExists(f"image {image_id} already exists in pool {self.config.pool}")
        owner = owner_tag()
        name = tmp_name(image_id, owner)
        self._remove_image(name, missing_ok=True)
        self._call(rbd.RBD().create, ioctx, name, size, old_format=False, features=FEATURES)
        image = self.open_raw(name)
        try:
            image.metadata_set(OWNER_KEY, owner)
            image.metadata_set(CREATED_KEY, str(int(time.time())))
        finally:
            image.close()
        return RbdTarget(self, image_id, name, size)

    def seal(self, target: RbdTarget) -> None:
        # Its own handle: the target's may be reading (the re-inspection)
        # meanwhile. Creating a snapshot waits for a monitor round (a new
        # pool snap id: up to paxos_propose_interval, 1 s by default), the
        # reason to overlap it with the re-inspection. The target reads the
        # snapshot afterwards.
        image = self.open_raw(target.name)
        try:
            self._call(image.create_snap, SNAPSHOT)
            self._call(image.protect_snap, SNAPSHOT)
        finally:
            image.close()
        target.sealed = True

    def finalize(self, target: RbdTarget) -> Location:
        _, rbd = _bindings()
        ioctx = self._connect()
        if not target.sealed:
            self.seal(target)
        target.close()
        self._call(rbd.RBD().rename, ioctx, target.name, target.image_id)
        return self._location(target.image_id)  # renamed just now: no need to open it again

    def abort(self, target: RbdTarget) -> None:
        """Remove the temporary image; when Ceph cannot be reached now, leave
        it to `cleanup` (it never carries the real name)."""
        _, rbd = _bindings()
        try:
            target.close()
            self._remove_image(target.name, missing_ok=True)
        except (StoreError, rbd.Error) as error:
            log.warning("could not remove %s now, cleanup will: %s", target.name, error)

    def exists(self, image_id: str) -> bool:
        _, rbd = _bindings()
        try:
            self.open_raw(image_id).close()
        except ImageNotFound:
            return False
        except rbd.Error:
            return True
        return True

    def location(self, image_id: str) -> Location:
        if not self.exists(image_id):
            raise ImageNotFound(f"image {image_id} not found in pool {self.config.pool}")
        return self._location(image_id)

    def _location(self, image_id: str) -> Location:
        url = f"rbd://{self.fsid()}/{self.config.pool}/{image_id}/{SNAPSHOT}"
        return Location(
            url=url, store=self.name, metadata={"pool": self.config.pool, "image": image_id, "snapshot": SNAPSHOT}
        )

    def open_image(self, image_id: str) -> RbdTarget:
        """The stored image's protected snapshot (what its location names),
        read-only; ImageNotFound when the image or its snapshot is missing."""
        image = self.open_raw(image_id, snapshot=SNAPSHOT)
        try:
            target = RbdTarget(self, image_id, image_id, image.size(), sealed=True)
        except BaseException:
            image.close()
            raise
        target._image, target._image_is_snapshot = image, True  # one open, not two
        return target

    def children(self, image_id: str) -> list[str]:
        """Clones of the image's snapshots (Nova/Cinder volumes and disks)."""
        image = self.open_raw(image_id)
        try:
            found = []
            for snapshot in image.list_snaps():
                image.set_snap(snapshot["name"])
                found += [f"{child['pool']}/{child['image']}" for child in image.list_children2()]
            return found
        finally:
            image.close()

    def protect(self, image_id: str, protected: bool = True) -> None:
        image = self.open_raw(image_id)
        try:
            if protected:
                self._call(image.metadata_set, PROTECTED_KEY, "1")
            else:
                with contextlib.suppress(KeyError):  # not protected
                    self._call(image.metadata_remove, PROTECTED_KEY)
        finally:
            image.close()

    def is_protected(self, image_id: str) -> bool:
        image = self.open_raw(image_id)
        try:
            return bool(self._call(image.metadata_get, PROTECTED_KEY) == "1")
        except KeyError:
            return False
        finally:
            image.close()

    def delete(self, image_id: str) -> None:
        if self.is_protected(image_id):
            raise ImageProtected(f"image {image_id} is protected; unprotect it first")
        clones = self.children(image_id)
        if clones:
            raise ImageInUse(f"image {image_id} is in use: its snapshot has clones ({', '.join(clones)})")
        self._remove_image(image_id, missing_ok=False)

    def _remove_image(self, name: str, *, missing_ok: bool) -> None:
        _, rbd = _bindings()
        ioctx = self._connect()
        try:
            image = self.open_raw(name)
        except ImageNotFound:
            if missing_ok:
                return
            raise
        try:
            for snapshot in list(image.list_snaps()):
                if image.is_protected_snap(snapshot["name"]):
                    try:
                        self._call(image.unprotect_snap, snapshot["name"])
                    except rbd.ImageBusy as error:
                        raise ImageInUse(f"image {name} is in use: its snapshot has clones") from error
                self._call(image.remove_snap, snapshot["name"])
        finally:
            image.close()
        for attempt in range(3):
            try:
                self._call(rbd.RBD().remove, ioctx, name)
                return
            except ImageNotFound:
                if not missing_ok:
                    raise
                return
            except rbd.ImageBusy:
                # A killed qemu-img keeps its watch for the watch timeout
                # (30 s). It is dead, or this temporary is abandoned: fence it
                # off (as `rbd lock break` does) instead of waiting.
                if attempt == 2 or not self._fence_watchers(name):
                    raise

    def _fence_watchers(self, name: str) -> bool:
        """Blocklist the clients still watching image `name`; True if any."""
        image = self.open_raw(name)
        try:
            watchers = list(image.watchers_list())
        finally:
            image.close()
        own = f"client.{self._cluster.get_instance_id()}"
        fenced = False
        for watcher in watchers:
            if f"client.{watcher.get('id')}" == own:
                continue
            self._cluster.blocklist_add(watcher["addr"], 3600)
            fenced = True
        return fenced

    def purge_temporaries(self, image_id: str) -> list[str]:
        """Remove every temporary of `image_id`, whoever wrote it (the caller
        holds the image's lease, so none of them is live)."""
        _, rbd = _bindings()
        removed = []
        for name in self._call(rbd.RBD().list, self._connect()):
            if name.startswith(image_id + TMP_MARKER):
                self._remove_image(name, missing_ok=True)
                removed.append(name)
        return removed

    def cleanup(self, is_live: Callable[[str, str], bool | None] | None = None) -> list[str]:
        """Remove abandoned temporaries. `is_live(image_id, owner)` decides
        first when given (the pipeline asks whether the image's lease is
        held); otherwise, or when it cannot tell, a temporary is abandoned
        when its owner process on this host is gone, or when another host's is
        older than `stale_after`."""
        _, rbd = _bindings()
        ioctx = self._connect()
        removed = []
        for name in self._call(rbd.RBD().list, ioctx):
            if TMP_MARKER not in name:
                continue
            image_id, _, owner = name.rpartition(TMP_MARKER)
            alive = is_live(image_id, owner) if is_live is not None else None
            if alive is None:
                alive = owner_alive(owner)
            if alive is None:
                try:
                    image = self.open_raw(name)
                    try:
                        created = int(image.metadata_get(CREATED_KEY))
                    finally:
                        image.close()
                except (StoreError, rbd.Error, ValueError):
                    created = 0
                alive = time.time() - created < self.config.stale_after
            if not alive:
                self._remove_image(name, missing_ok=True)
                removed.append(name)
        return removed
