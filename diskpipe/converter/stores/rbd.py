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
import datetime
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from diskpipe.config import section
from diskpipe.converter.checksums import Extent
from diskpipe.converter.qemu_img import CancelToken, TargetSpec
from diskpipe.converter.stores import base
from diskpipe.converter.stores.base import ImageNotFound, Leftover, StoreError, StoreMisconfigured, StoreUnavailable

log = logging.getLogger(__name__)
SNAPSHOT = "snap"
# layering | exclusive-lock | object-map | fast-diff | deep-flatten
FEATURES = 1 | 4 | 8 | 16 | 32
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
    stale_after: int = base.STALE_AFTER  # another host's leftovers are removed after this many seconds

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


def _check_setup_file(path: str, what: str, remedy: str) -> None:
    """A file librados must read, readable and regular, or a message naming it."""
    if "," in path:
        return  # librados's list of candidate files: it picks the first that exists
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as error:
        raise StoreMisconfigured(f"{what} {path} does not exist ({remedy})") from error
    except OSError as error:
        raise StoreMisconfigured(f"{what} {path} cannot be read: {error.strerror} ({remedy})") from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreMisconfigured(f"{what} {path} is not a regular file ({remedy})")
    finally:
        os.close(fd)


def _connect_error(config: RbdConfig, error: Exception) -> StoreError:
    """What a failed connect means, by librados's errno. With cephx, the
    monitor's answers tell a keyring that was not found (ENOENT), one that
    holds no key for the user (EPERM), a user or key the cluster rejects
    (EACCES) and a keyring that cannot be parsed (EIO) apart; anything else
    (a timeout above all) is a cluster that cannot be reached."""
    user = f"client.{config.user}"
    keyring = config.keyring or f"the keyring named in {config.conf_path()} or Ceph's default keyring paths"
    code = getattr(error, "errno", None)
    if code == errno.ENOENT:
        return StoreMisconfigured(f"no keyring found for {user}: looked in {keyring} (set [rbd] keyring)")
    if code == errno.EPERM:
        return StoreMisconfigured(f"{keyring} holds no key for Ceph user {user} (check [rbd] user and keyring)")
    if code == errno.EACCES:
        return StoreMisconfigured(
            f"Ceph rejected user {user}: the cluster does not know it, or its key in {keyring} is wrong "
            "(check [rbd] user and keyring)"
        )
    if code == errno.EIO:
        return StoreMisconfigured(f"the key for Ceph user {user} in {keyring} cannot be used (a malformed keyring?)")
    return StoreUnavailable(f"Ceph is unreachable ({config.conf_path()}, user {user}): {error}")


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
    capabilities = base.Capabilities(
        writes_directly=True, keeps_formats=frozenset({"raw"}), local_target=False, hashes_after_seal=True
    )

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
            cluster = self._cluster_handle(rados)
            try:
                cluster.connect(timeout=self.config.connect_timeout)
            except (rados.Error, OSError) as error:
                cluster.shutdown()
                raise _connect_error(self.config, error) from error
            try:
                ioctx = cluster.open_ioctx(self.config.pool)
            except rados.ObjectNotFound as error:
                cluster.shutdown()
                raise StoreMisconfigured(
                    f"RBD pool {self.config.pool!r} does not exist (cluster of {self.config.conf_path()})"
                ) from error
            except (rados.Error, OSError) as error:
                cluster.shutdown()
                raise StoreUnavailable(f"Ceph did not open pool {self.config.pool!r}: {error}") from error
            self._cluster, self._ioctx = cluster, ioctx
            return ioctx

    def _cluster_handle(self, rados: Any) -> Any:
        """A cluster handle with the configuration read. librados reports a
        missing file as "object not found", like a missing pool, so the
        files are checked here first and each gets its own message."""
        conf = self.config.conf_path()
        _check_setup_file(conf, "Ceph configuration file", "set [rbd] conf or CEPH_CONF")
        if self.config.keyring:
            _check_setup_file(self.config.keyring, "Ceph keyring", "set [rbd] keyring")
        try:
            return rados.Rados(conffile=conf, rados_id=self.config.user, conf=self.config.client_options())
        except (rados.Error, OSError) as error:
            raise StoreMisconfigured(f"Ceph configuration file {conf} cannot be parsed ({error})") from error

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
            raise base.ImageExists(str(error)) from error
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
        base.check_image_id(image_id)  # it becomes part of qemu's `rbd:pool/name:...` filename
        rados, rbd = _bindings()
        ioctx = self._connect()
        if self.exists(image_id):
            raise base.ImageExists(f"image {image_id} already exists in pool {self.config.pool}")
        # The name says who writes it (host, namespace key, pid) and the image's own
        # creation time how old it is: `cleanup` needs nothing else, so the
        # image is created and not opened (each open and metadata write is a
        # round trip on the way to qemu-img).
        name = base.tmp_name(image_id, base.owner_tag())
        try:
            try:
                self._call(rbd.RBD().create, ioctx, name, size, old_format=False, features=FEATURES)
            except base.ImageExists:
                # Left by a dead process that had our pid (ours are one at a time).
                self._remove_image(name, missing_ok=True, abandoned=True)
                self._call(rbd.RBD().create, ioctx, name, size, old_format=False, features=FEATURES)
            return RbdTarget(self, image_id, name, size)
        except StoreError:
            raise  # the cluster's answer: no image, or Ceph away (then cleanup removes one)
        except (rbd.Error, rados.Error) as error:
            # Any other answer is the store's too (a caller tells store trouble
            # from a refusal or a bug by StoreError), e.g. a user without write caps.
            refused = isinstance(error, (rbd.PermissionError, rados.PermissionError))
            kind = StoreMisconfigured if refused else StoreError
            raise kind(f"cannot create {name} in pool {self.config.pool}: {error}") from error
        except BaseException:
            # Stopped (Ctrl-C, SIGTERM, a worker's time limit): Python raises
            # it once librbd's create has returned, so the image may exist,
            # and no caller holds a target to abort. Remove it here.
            with contextlib.suppress(StoreError, rbd.Error, rados.Error):
                self._remove_image(name, missing_ok=True, abandoned=True)
            raise

    def seal(self, target: RbdTarget, cancel: CancelToken | None = None) -> None:
        # Its own handle: the target's may be reading (the re-inspection)
        # meanwhile. Creating a snapshot waits for a monitor round (a new
        # pool snap id: up to paxos_propose_interval, 1 s by default), the
        # reason to overlap it with the re-inspection. The target reads the
        # snapshot afterwards. Not stopped by `cancel`: a snapshot half made
        # is worse than a second's wait, and abort removes the image anyway.
        image = self.open_raw(target.name)
        try:
            self._call(image.create_snap, SNAPSHOT)
            self._call(image.protect_snap, SNAPSHOT)
        finally:
            image.close()
        target.sealed = True

    def finalize(self, target: RbdTarget) -> base.Location:
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
        rados, rbd = _bindings()
        try:
            target.close()
            # Our qemu-img has exited (or was killed): nobody writes it any more.
            self._remove_image(target.name, missing_ok=True, abandoned=True)
        except (StoreError, rbd.Error, rados.Error) as error:
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

    def location(self, image_id: str) -> base.Location:
        if not self.exists(image_id):
            raise ImageNotFound(f"image {image_id} not found in pool {self.config.pool}")
        return self._location(image_id)

    def _location(self, image_id: str) -> base.Location:
        url = f"rbd://{self.fsid()}/{self.config.pool}/{image_id}/{SNAPSHOT}"
        return base.Location(
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
            raise base.ImageProtected(f"image {image_id} is protected; unprotect it first")
        clones = self.children(image_id)
        if clones:
            raise base.ImageInUse(f"image {image_id} is in use: its snapshot has clones ({', '.join(clones)})")
        self._remove_image(image_id, missing_ok=False)

    def _remove_image(self, name: str, *, missing_ok: bool, abandoned: bool = False) -> None:
        """Remove image `name` and its snapshots. `abandoned`: a temporary
        whose writer is dead (killed by us, or its owner gone): its
        watchers are fenced off first, because librbd's remove otherwise
        waits out the dead writer's exclusive lock (the 30 s watch timeout)."""
        rados, rbd = _bindings()
        ioctx = self._connect()
        try:
            image = self.open_raw(name)
        except ImageNotFound:
            if missing_ok:
                return
            raise
        try:
            if abandoned:
                try:
                    self._fence(image, name)
                except rados.Error as error:  # no blocklist permission: the remove waits the watch out
                    log.warning("could not fence the watchers of %s: %s", name, error)
            self._remove_snapshots(image, name)
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
                if attempt == 2 or not self._fence_writers(name):
                    raise

    def _remove_snapshots(self, image: Any, name: str) -> None:
        _, rbd = _bindings()
        for snapshot in list(image.list_snaps()):
            if image.is_protected_snap(snapshot["name"]):
                try:
                    self._call(image.unprotect_snap, snapshot["name"])
                except rbd.ImageBusy as error:
                    raise base.ImageInUse(f"image {name} is in use: its snapshot has clones") from error
            self._call(image.remove_snap, snapshot["name"])

    def _fence_writers(self, name: str) -> list[str]:
        """Fence the writers of image `name` (see _fence); the addresses fenced."""
        image = self.open_raw(name)
        try:
            return self._fence(image, name)
        finally:
            image.close()

    def _fence(self, image: Any, name: str) -> list[str]:
        """Blocklist every other client that watches the image or holds its
        exclusive lock (`ceph osd blocklist add`, for an hour), and wait
        until this client has the OSD map that says so: from then on no OSD
        takes a write from them, even if they come back (a host cut off the
        network, a paused process). Returns the addresses fenced."""
        own = self._cluster.get_instance_id()  # this client watches the image while it looks
        watchers = [watcher["addr"] for watcher in image.watchers_list() if watcher.get("id") != own]
        lockers = image.list_lockers()
        holders = [address for client, _, address in (lockers or {}).get("lockers", []) if client != f"client.{own}"]
        fenced = sorted(set(watchers + holders))
        for address in fenced:
            self._cluster.blocklist_add(address, 3600)
        if fenced:
            log.warning("image %s: fenced its writers %s (blocklisted)", name, ", ".join(fenced))
            self._cluster.wait_for_latest_osdmap()
        return fenced

    def purge_temporaries(self, image_id: str) -> list[str]:
        """Remove every temporary of `image_id`, whoever wrote it (the caller
        holds the image's lease, so none of them is live)."""
        _, rbd = _bindings()
        removed = []
        for name in self._call(rbd.RBD().list, self._connect()):
            if base.is_tmp_of(name, image_id):
                self._remove_image(name, missing_ok=True, abandoned=True)
                removed.append(name)
        return removed

    def cleanup(self, is_live: Callable[[str, str], bool | None] | None = None) -> list[Leftover]:
        """Remove abandoned temporaries. `is_live(image_id, owner)` decides
        first when given (the pipeline asks whether the image's lease is
        held); otherwise, or when it cannot tell, a temporary is abandoned
        when its owner process on this host is gone, or when another host's is
        older than `stale_after`. One that cannot be removed is named with
        the reason, and the others are still removed."""
        _, rbd = _bindings()
        found = []
        for name in self._call(rbd.RBD().list, self._connect()):
            temporary = base.split_tmp_name(name)
            if temporary is None:
                continue
            image_id, owner = temporary
            if not self._abandoned(name, image_id, owner, is_live):
                continue
            found.append(self._remove_leftover(name))
        return found

    def _abandoned(
        self, name: str, image_id: str, owner: str, is_live: Callable[[str, str], bool | None] | None
    ) -> bool:
        _, rbd = _bindings()
        alive = is_live(image_id, owner) if is_live is not None else None
        if alive is None:
            alive = base.owner_alive(owner)
        if alive is None:
            try:
                image = self.open_raw(name)
                try:
                    # librbd gives the creation time as a naive UTC datetime.
                    created = image.create_timestamp().replace(tzinfo=datetime.UTC).timestamp()
                finally:
                    image.close()
            except (StoreError, rbd.Error, ValueError):
                created = 0
            alive = time.time() - created < self.config.stale_after
        return not alive

    def _remove_leftover(self, name: str) -> Leftover:
        rados, rbd = _bindings()
        try:
            self._remove_image(name, missing_ok=True, abandoned=True)
        except base.ImageInUse as error:
            return Leftover(name, False, f"{error}; flatten or remove the clones first")
        except rbd.ImageBusy:
            return Leftover(name, False, f"watchers still alive, retry after {self._watch_timeout()} s")
        except rados.PermissionError as error:
            return Leftover(
                name,
                False,
                f"its watchers could not be fenced off (Ceph user client.{self.config.user} may not blocklist: "
                f"{error}); a dead writer's watch expires: retry after {self._watch_timeout()} s",
            )
        except (StoreError, rbd.Error, rados.Error) as error:
            return Leftover(name, False, f"{error}; retry later")
        return Leftover(name, True)

    def _watch_timeout(self) -> int:
        """Seconds after which the OSDs drop a dead client's watch."""
        try:
            return int(self._cluster.conf_get("osd_client_watch_timeout"))
        except Exception:  # noqa: BLE001 - only a hint in a message
            return 30
