"""Where an import's data comes from: a local path under the configured
import directories, or an HTTP(S) URL (Glance's web-download), staged in a
capped directory; compressed data is unpacked as a stream and an OVA gives
up its disk.

Guards: a local path must resolve inside an import directory and is opened
without following symlinks, and the open descriptor (not the path) is what
later steps read, so a swapped symlink cannot redirect the import. A URL's
scheme, host and port pass allow/deny lists, its host resolves to addresses
that are checked against denied networks (loopback, private, link-local...)
and the connection goes to the checked address, also on every redirect.
Downloads are validated while they arrive (a refused claim aborts them),
size-capped and time-limited.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import ipaddress
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from diskpipe.formats import ImageInfo, StreamInspector
from diskpipe.formats.policy import Policy, check
from diskpipe.validation import UnsafeImage, provisional_info

GiB = 1 << 30
COPY_CHUNK = 4 * 1024 * 1024
ZERO_CHUNK = bytes(COPY_CHUNK)
MAX_REDIRECTS = 5
DENIED_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "::ffff:0:0/96",
)  # fmt: skip


class SourceRefused(Exception):
    """The source may not be imported (path outside the import directories,
    URL denied, too large...). Not retried."""


class SourceUnavailable(Exception):
    """The source could not be fetched right now (network): retried."""


@dataclass(frozen=True, slots=True)
class ImportConfig:
    """The `[import]` section of the configuration file."""

    allowed_dirs: tuple[str, ...] = ()  # local paths a submitter may import from
    staging_dir: str = "/var/tmp/diskpipe-staging"
    staging_cap: int = 256 * GiB  # all staged files together
    max_download: int = 64 * GiB
    # Unpacking compressed uploads and OVAs (see diskpipe.tasks.unpacking).
    max_decompressed: int = 2048 * GiB  # zeros included; never above [policy] max_virtual_size
    max_expansion_ratio: int = 200  # non-zero bytes unpacked per packed byte
    max_unpack_layers: int = 1  # containers unpacked one inside another (an OVA in gzip is 2)
    max_ova_members: int = 1000
    unpack_timeout: float = 3 * 3600.0  # wall clock, all layers together
    unpack_cpu_time: float = 2 * 3600.0  # CPU seconds of the unpacking thread
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    download_timeout: float = 6 * 3600.0
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_hosts: tuple[str, ...] = ()  # glob patterns; empty: any host not denied
    denied_hosts: tuple[str, ...] = ()
    allowed_ports: tuple[int, ...] = (80, 443)
    denied_networks: tuple[str, ...] = DENIED_NETWORKS
    allowed_networks: tuple[str, ...] = ()  # explicit exceptions to denied_networks


def load_import_config(path: str | None = None, **overrides: Any) -> ImportConfig:
    from diskpipe.config import load_file, load_section

    return load_section(ImportConfig, "import", load_file(path).get("import", {}), **overrides)


@dataclass
class Staged:
    """Data ready for inspection: an open descriptor and how qemu-img reaches it."""

    fd: int
    path: str  # the staged file, or the checked original for local imports
    owned: bool  # True: a staged copy that must be removed afterwards
    description: str
    unpacked: list[str] | None = None  # what was unpacked to get here (gzip, ova...)

    @property
    def qemu_path(self) -> str:
        """qemu-img opens the already checked file through its descriptor."""
        return f"/dev/fd/{self.fd}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# -- local paths -----------------------------------------------------------


def open_local(path: str, config: ImportConfig) -> Staged:
    """Open a local file that must lie inside an import directory."""
    if not config.allowed_dirs:
        raise SourceRefused("local imports are disabled: no [import] allowed_dirs configured")
    resolved = os.path.realpath(path)
    allowed = [os.path.realpath(directory) for directory in config.allowed_dirs]
    if not any(resolved == base or resolved.startswith(base.rstrip("/") + "/") for base in allowed):
        raise SourceRefused(f"{path} is outside the import directories ({', '.join(config.allowed_dirs)})")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise SourceRefused(f"{path}: {error.strerror}") from error
    status = os.fstat(fd)
    # The file opened must still be the one that was checked.
    if not os.path.samestat(status, os.stat(resolved)) or os.path.realpath(path) != resolved:
        os.close(fd)
        raise SourceRefused(f"{path} changed while it was being opened")
    import stat as stat_module

    if not stat_module.S_ISREG(status.st_mode):
        os.close(fd)
        raise SourceRefused(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return Staged(fd=fd, path=resolved, owned=False, description=path)


# -- staging ---------------------------------------------------------------


def _staging_used(directory: str) -> int:
    """Named staged files and the claims of unpacked (anonymous) layers."""
    from diskpipe.tasks.unpacking import staged_bytes

    return staged_bytes(directory)


def new_staging_file(config: ImportConfig, label: str) -> tuple[int, str]:
    os.makedirs(config.staging_dir, mode=0o700, exist_ok=True)
    if _staging_used(config.staging_dir) >= config.staging_cap:
        raise SourceUnavailable(f"staging directory {config.staging_dir} is full ({config.staging_cap} bytes cap)")
    path = os.path.join(config.staging_dir, f"{label}.{uuid.uuid4().hex[:12]}.staged")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return fd, path


class SparseWriter:
    """Writes a stream to a staged file, leaving holes for zero chunks."""

    def __init__(self, fd: int, cap: int, what: str) -> None:
        self.fd = fd
        self.cap = cap
        self.what = what
        self.written = 0

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.cap:
            raise SourceRefused(f"{self.what} exceeds the cap of {self.cap} bytes")
        view = memoryview(data)
        for start in range(0, len(view), COPY_CHUNK):
            piece = view[start : start + COPY_CHUNK]
            if piece != memoryview(ZERO_CHUNK)[: len(piece)]:
                os.pwrite(self.fd, piece, self.written + start)
        self.written += len(data)

    def finish(self) -> None:
        os.ftruncate(self.fd, self.written)
        os.fsync(self.fd)


# -- URLs ------------------------------------------------------------------


def _host_allowed(host: str, config: ImportConfig) -> None:
    lowered = host.lower().rstrip(".")
    if any(fnmatch.fnmatch(lowered, pattern.lower()) for pattern in config.denied_hosts):
        raise SourceRefused(f"host {host} is denied")
    if config.allowed_hosts and not any(fnmatch.fnmatch(lowered, pattern.lower()) for pattern in config.allowed_hosts):
        raise SourceRefused(f"host {host} is not in the allowed hosts")


def _address_allowed(address: str, config: ImportConfig) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if any(ip in ipaddress.ip_network(network) for network in config.allowed_networks):
        return True
    return not any(ip in ipaddress.ip_network(network) for network in config.denied_networks)


def check_url(url: str, config: ImportConfig) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, request path, address to connect to), or SourceRefused."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in config.allowed_schemes:
        raise SourceRefused(f"scheme {scheme or '(none)'!r} is not allowed")
    if parts.username or parts.password:
        raise SourceRefused("URLs with credentials are not accepted")
    host = parts.hostname
    if not host:
        raise SourceRefused(f"no host in {url!r}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as error:
        raise SourceRefused(f"bad port in {url!r}") from error
    if config.allowed_ports and port not in config.allowed_ports:
        raise SourceRefused(f"port {port} is not allowed")
    _host_allowed(host, config)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise SourceUnavailable(f"cannot resolve {host}: {error}") from error
    addresses = sorted({str(info[4][0]) for info in infos})
    denied = [address for address in addresses if not _address_allowed(address, config)]
    if denied:
        # Any denied address refuses the host: DNS could hand out either.
        raise SourceRefused(f"{host} resolves to a denied address ({', '.join(denied)})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path, addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        # Certificate checked against the host name, connection to the checked address.
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def _open_url(url: str, config: ImportConfig) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path, address = check_url(current, config)
        connection_class = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = connection_class(host, port, address, config.connect_timeout)
        try:
            connection.request("GET", path, headers={"User-Agent": "diskpipe", "Accept-Encoding": "identity"})
            connection.sock.settimeout(config.read_timeout)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise SourceUnavailable(f"cannot fetch {current}: {error}") from error
        if response.status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            connection.close()
            if not location:
                raise SourceRefused(f"{current}: redirect without a location")
            current = urljoin(current, location)
            continue
        if response.status != 200:
            connection.close()
            if response.status >= 500 or response.status == 429:
                raise SourceUnavailable(f"{current}: HTTP {response.status}")
            raise SourceRefused(f"{current}: HTTP {response.status} {response.reason}")
        return response, connection
    raise SourceRefused(f"{url}: more than {MAX_REDIRECTS} redirects")


def download(
    url: str,
    config: ImportConfig,
    *,
    claimed: str | None,
    policy: Policy,
    label: str,
    cancelled: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int | None], None] | None = None,
) -> Staged:
    """Stream a URL into the staging directory, validating while it arrives."""
    response, connection = _open_url(url, config)
    fd, path = new_staging_file(config, label)
    staged = Staged(fd=fd, path=path, owned=True, description=url)
    try:
        length_header = response.getheader("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        if expected is not None and expected > config.max_download:
            raise SourceRefused(f"{url} is {expected} bytes, above the cap of {config.max_download}")
        writer = SparseWriter(fd, config.max_download, f"download of {url}")
        deadline = time.monotonic() + config.download_timeout

        def chunks() -> Iterator[bytes]:
            while True:
                if cancelled():
                    raise InterruptedError("download cancelled")
                if time.monotonic() > deadline:
                    raise SourceUnavailable(f"download of {url} took longer than {config.download_timeout:.0f} s")
                try:
                    chunk = response.read(COPY_CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    raise SourceUnavailable(f"download of {url} failed: {error}") from error
                if not chunk:
                    return
                yield chunk

        # The inspector sees every byte as it arrives, and what the head
        # decides (a claim that cannot match, a hidden format...) aborts the
        # download. Compressed data and OVAs are judged after unpacking; the
        # full verdict is always taken again on the staged file.
        inspector = StreamInspector()
        head_checked = False
        for chunk in chunks():
            inspector.feed(chunk)
            if not head_checked and (provisional := provisional_info(inspector)) is not None:
                head_checked = True
                if not provisional.content_kinds() & {"compressed", "archive"}:
                    early = check(provisional, policy, claimed, final=False)
                    if not early.safe:
                        raise UnsafeImage(early.issues, early)
            writer.write(chunk)
            if progress is not None:
                progress(writer.written, expected)
        if expected is not None and writer.written != expected:
            raise SourceUnavailable(f"download of {url} ended after {writer.written} of {expected} bytes")
        writer.finish()
    except BaseException:
        staged.close()
        raise
    finally:
        connection.close()
    return staged


# -- unpacking ---------------------------------------------------------------


def unpack(
    staged: Staged, config: ImportConfig, label: str, *, max_virtual_size: int | None = None
) -> tuple[Staged, ImageInfo]:
    """Inspect staged data; unpack compressed data and OVAs under the caps
    of `diskpipe.tasks.unpacking`. Returns the data to convert and its facts."""
    from diskpipe.tasks import unpacking

    return unpacking.unpack(staged, config, label, max_virtual_size=max_virtual_size)


def cleanup_staging(config: ImportConfig, older_than: float = 24 * 3600) -> list[str]:
    """Remove staged files older than `older_than` seconds (a dead worker's)."""
    removed: list[str] = []
    if not os.path.isdir(config.staging_dir):
        return removed
    limit = time.time() - older_than
    for entry in os.scandir(config.staging_dir):
        if entry.name.endswith(".staged") and entry.stat(follow_symlinks=False).st_mtime < limit:
            os.unlink(entry.path)
            removed.append(entry.name)
    from diskpipe.tasks.unpacking import remove_void_claims

    return removed + remove_void_claims(config.staging_dir)
