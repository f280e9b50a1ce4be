"""The file store: images as sparse files in a directory (the embedded default).
qemu-img writes the stored file itself; raw and qcow2 are kept; a protected
image is read-only (mode 0440) and `delete` refuses it.

A conversion writes `.<id>.tmp.<owner>`; `finalize` fsyncs it and links it
to `<id>.<format>` (a hard link fails if the name exists, so nothing is
overwritten), then drops the temporary name.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from diskpipe.converter.qemu_img import CancelToken, TargetSpec
from diskpipe.converter.stores import base
from diskpipe.converter.stores.base import ImageExists, ImageNotFound, Leftover, Location
from diskpipe.converter.stores.localfiles import DescriptorTarget

log = logging.getLogger(__name__)
FORMATS = ("raw", "qcow2")
# A protected image is read-only for everyone: the mark lives with the file,
# and `chmod` shows it to an operator.
IMAGE_MODE = 0o640
PROTECTED_MODE = 0o440


# A directory diskpipe may not write: the operator's to fix, not worth a retry.
_SETUP_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})


def store_error(directory: Path, doing: str, error: OSError) -> base.StoreError:
    """An OSError in the store directory as a store error that names it."""
    message = f"file store {directory}: {doing}: {error.strerror or error}"
    if error.errno in _SETUP_ERRNOS:
        return base.StoreMisconfigured(f"{message} (the store directory must be writable)")
    return base.StoreUnavailable(message)


class FileTarget(DescriptorTarget):
    def __init__(self, image_id: str, path: Path, final_path: Path, size: int, image_format: str) -> None:
        self.image_id = image_id
        self.path = path
        self.final_path = final_path
        self.name = path.name
        self.size = size
        self.format = image_format
        self.created = False  # this target made the file at `path` (abort removes only that)
        self._fd: int | None = None

    def qemu_target(self) -> TargetSpec:
        """qemu-img writes through a descriptor on a file created here, so
        the store directory's path never reaches it as a name."""
        if self._fd is None:
            self._fd = self._create(os.O_NOFOLLOW)
        return TargetSpec.descriptor(self._fd)

    def _create(self, flags: int = 0) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | flags, 0o640)
        except OSError as error:
            raise store_error(self.path.parent, f"cannot create {self.name}", error) from error
        self.created = True
        return fd

    def _open(self, flags: int = os.O_RDONLY) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        return self._fd

    def _descriptor_for(self, writing: bool) -> int:
        if writing and self._fd is None and not self.path.exists():
            # A target written from Python, not by qemu-img: an empty sparse file.
            self._fd = self._create(os.O_NOFOLLOW)
            os.ftruncate(self._fd, self.size)
        return self._open(os.O_RDWR if writing else os.O_RDONLY)

    def sync(self) -> None:
        fd = self._open()
        try:
            os.fsync(fd)
        except OSError as error:
            # The disk's answer, neither the image's fault nor a bug: a full
            # disk may pass (retried), a failing one is a store error.
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            kind = base.StoreUnavailable if full else base.StoreError
            raise kind(f"cannot make {self.path} durable: {error}") from error

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FileStore:
    name = "file"
    capabilities = base.Capabilities(writes_directly=True, keeps_formats=frozenset(FORMATS), local_target=True)

    def __init__(self, directory: str | os.PathLike[str], stale_after: int = base.STALE_AFTER) -> None:
        self.directory = Path(directory)
        self.stale_after = stale_after  # see base.STALE_AFTER

    def _ensure(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise store_error(self.directory, "cannot create the directory", error) from error

    def _final(self, image_id: str, image_format: str = "raw") -> Path:
        return self.directory / f"{base.check_image_id(image_id)}.{image_format}"

    def _find(self, image_id: str) -> Path | None:
        for image_format in FORMATS:
            path = self._final(image_id, image_format)
            if path.exists():
                return path
        return None

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> FileTarget:
        self._ensure()
        if self._find(image_id) is not None:
            raise ImageExists(f"image {image_id} already exists in {self.directory}")
        path = self.directory / ("." + base.tmp_name(image_id, base.owner_tag()))
        if path.exists():
            path.unlink()
        return FileTarget(image_id, path, self._final(image_id, image_format), size, image_format)

    def seal(self, target: FileTarget, cancel: CancelToken | None = None) -> None:
        target.sync()  # one fsync: not worth stopping halfway

    def finalize(self, target: FileTarget) -> Location:
        target.sync()  # again: cheap when sealed, and finalize must not rely on it
        target.close()
        try:
            os.link(target.path, target.final_path)
        except FileExistsError as error:
            raise ImageExists(f"image {target.image_id} already exists") from error
        target.path.unlink()
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self.location(target.image_id)

    def abort(self, target: FileTarget) -> None:
        """Remove the temporary; when that fails (the filesystem went
        read-only), leave it to `cleanup` rather than hide the first error."""
        target.close()
        if not target.created:
            return
        try:
            target.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("could not remove %s now, cleanup will: %s", target.path, error.strerror or error)

    def exists(self, image_id: str) -> bool:
        return self._find(image_id) is not None

    def location(self, image_id: str) -> Location:
        path = self._find(image_id)
        if path is None:
            raise ImageNotFound(f"image {image_id} not found in {self.directory}")
        return Location(url=path.resolve().as_uri(), store=self.name, metadata={"path": str(path.resolve())})

    def open_image(self, image_id: str) -> FileTarget:
        path = self._find(image_id)
        if path is None:
            raise ImageNotFound(f"image {image_id} not found in {self.directory}")
        return FileTarget(image_id, path, path, path.stat().st_size, path.suffix.lstrip("."))

    def delete(self, image_id: str) -> None:
        path = self._find(image_id)
        if path is None:
            raise ImageNotFound(f"image {image_id} not found in {self.directory}")
        if self.is_protected(image_id):
            raise base.ImageProtected(f"image {image_id} is protected; unprotect it first")
        path.unlink()

    def protect(self, image_id: str, protected: bool = True) -> None:
        path = self._find(image_id)
        if path is None:
            raise ImageNotFound(f"image {image_id} not found in {self.directory}")
        path.chmod(PROTECTED_MODE if protected else IMAGE_MODE)

    def is_protected(self, image_id: str) -> bool:
        path = self._find(image_id)
        if path is None:
            raise ImageNotFound(f"image {image_id} not found in {self.directory}")
        return not path.stat().st_mode & 0o200

    def purge_temporaries(self, image_id: str) -> list[str]:
        """Remove every temporary of `image_id`, whoever wrote it (the caller
        holds the image's lease, so none of them is live)."""
        removed: list[str] = []
        if not self.directory.is_dir():
            return removed
        for entry in self.directory.iterdir():
            if entry.name.startswith(".") and base.is_tmp_of(entry.name[1:], image_id):
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def _recently_written(self, entry: Path) -> bool:
        """A writer that cannot be asked (another host's, or one from before
        a reboot) is judged by the file's last write: qemu-img writing into
        it keeps its mtime fresh."""
        try:
            written = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return True  # gone meanwhile: nothing to remove
        return time.time() - written < self.stale_after

    def cleanup(self, is_live: Callable[[str, str], bool | None] | None = None) -> list[Leftover]:
        """Remove temporaries whose writer is gone (see RbdStore.cleanup)."""
        found: list[Leftover] = []
        if not self.directory.is_dir():
            return found
        for entry in self.directory.iterdir():
            temporary = base.split_tmp_name(entry.name[1:]) if entry.name.startswith(".") else None
            if temporary is None:
                continue
            image_id, owner = temporary
            alive = is_live(image_id, owner) if is_live is not None else None
            if alive is None:
                alive = base.owner_alive(owner)
            if alive is None:
                alive = self._recently_written(entry)
            if alive is False:
                try:
                    entry.unlink(missing_ok=True)
                except OSError as error:
                    found.append(Leftover(entry.name, False, f"{error.strerror or error} in {self.directory}"))
                    continue
                found.append(Leftover(entry.name, True))
        return found
