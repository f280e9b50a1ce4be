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
import errno
import fnmatch
import http.client
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from diskpipe.config import section
from diskpipe.formats import ImageInfo, StreamInspector
from diskpipe.formats.policy import Policy
from diskpipe.jobs import addresses, transfer
from diskpipe.validation import HeadCheck

GiB = 1 << 30
COPY_CHUNK = 4 * 1024 * 1024
ZERO_CHUNK = bytes(COPY_CHUNK)
CLAIM_STEP = 16 * 1024 * 1024  # a download's claim follows its data in steps of this much
MAX_REDIRECTS = 5
DENIED_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "::ffff:0:0/96",
    # and every IPv6 address that embeds a denied IPv4 address (addresses.py)
)  # fmt: skip


class SourceRefused(Exception):
    """The source may not be imported (path outside the import directories,
    URL denied, too large...). Not retried."""


class SourceUnavailable(Exception):
    """The source could not be fetched right now (network): retried."""


@section("import")
@dataclass(frozen=True, slots=True)
class ImportConfig:
    """The `[import]` section of the configuration file."""

    allowed_dirs: tuple[str, ...] = ()  # local paths a submitter may import from
    staging_dir: str = "/var/tmp/diskpipe-staging"
    staging_cap: int = 256 * GiB  # all staged files together
    max_download: int = 64 * GiB
    # Unpacking compressed uploads and OVAs (see diskpipe.jobs.unpacking).
    max_decompressed: int = 2048 * GiB  # zeros included; never above [policy] max_virtual_size
    max_expansion_ratio: int = 200  # non-zero bytes unpacked per packed byte
    max_unpack_layers: int = 1  # containers unpacked one inside another (an OVA in gzip is 2)
    max_ova_members: int = 1000
    unpack_timeout: float = 3 * 3600.0  # wall clock, all layers together
    unpack_cpu_time: float = 2 * 3600.0  # CPU seconds of the unpacking thread
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    download_timeout: float = 6 * 3600.0  # the whole transfer: connect, redirects, every receive
    # A download slower than min_rate bytes/s over any min_rate_window seconds
    # (after the first) is cut off: 64 KiB/s is 512 kbit/s, below any link a
    # multi-GiB image is fetched over, and 30 s rides out TCP retransmits and
    # short server pauses; a trickling server holds a worker 30 s, not hours.
    min_rate: int = 64 * 1024  # 0: no minimum
    min_rate_window: float = 30.0
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_hosts: tuple[str, ...] = ()  # glob patterns; empty: any host not denied
    denied_hosts: tuple[str, ...] = ()
    allowed_ports: tuple[int, ...] = (80, 443)
    denied_networks: tuple[str, ...] = DENIED_NETWORKS
    allowed_networks: tuple[str, ...] = ()  # explicit exceptions to denied_networks
    allow_hard_links: bool = False  # a local file with other names (links) elsewhere


@dataclass
class Staged:
    """Data ready for inspection: an open descriptor, which is also what
    the conversion reads (the path is never reopened)."""

    fd: int
    path: str  # the staged file, or the checked original for local imports
    owned: bool  # True: a staged copy that must be removed afterwards
    description: str
    unpacked: list[str] | None = None  # what was unpacked to get here (gzip, ova...)
    # Said while the data arrived (a stream that could not decide): for the record.
    stream_notes: tuple[str, ...] = ()

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
        raise SourceRefused(f"{path!r} is outside the import directories ({', '.join(config.allowed_dirs)})")
    base = next(base for base in allowed if resolved == base or resolved.startswith(base.rstrip("/") + "/"))
    try:
        fd = open_beneath(base, os.path.relpath(resolved, base))
    except OSError as error:
        raise SourceRefused(f"{path!r}: {error.strerror}") from error
    status = os.fstat(fd)
    import stat as stat_module

    if not stat_module.S_ISREG(status.st_mode):
        os.close(fd)
        raise SourceRefused(f"{path!r} is not a regular file")
    # A hard link is the same file under another name, possibly in a tree the
    # submitter may not import from; the path check cannot see that name.
    if status.st_nlink > 1 and not config.allow_hard_links:
        os.close(fd)
        raise SourceRefused(
            f"{path!r} has {status.st_nlink} hard links (it may be a file from outside the import directories); "
            "[import] allow_hard_links = true accepts it"
        )
    os.set_blocking(fd, True)
    return Staged(fd=fd, path=resolved, owned=False, description=path)


def open_beneath(base: str, relative: str) -> int:
    """Open `relative` under the directory `base` one component at a time,
    each with O_NOFOLLOW relative to the directory opened before it.

    The path was resolved (realpath) and checked against the import
    directories, but a submitter who can write there could swap a directory
    on that path for a symlink between the check and an open by name.
    Walking with descriptors, a component that is now a symlink fails
    (ELOOP/ENOTDIR) instead of leading out of the tree.
    """
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EINVAL, "not a file inside the import directory")
    directory = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            os.close(directory)
            directory = inner
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=directory)
    finally:
        os.close(directory)


# -- staging ---------------------------------------------------------------


def open_download_file(config: ImportConfig, label: str, description: str) -> Staged:
    """An anonymous staged file for a download (see diskpipe.jobs.unpacking:
    its data goes with its last descriptor, whatever kills the job; a locked
    claim file announces its size to `staging_cap`)."""
    from diskpipe.jobs.unpacking import open_layer, staged_bytes

    try:
        os.makedirs(config.staging_dir, mode=0o700, exist_ok=True)
        used = staged_bytes(config.staging_dir)
    except OSError as error:
        raise SourceUnavailable(f"cannot stage in {config.staging_dir}: {error}") from error
    if used >= config.staging_cap:
        raise SourceUnavailable(f"staging directory {config.staging_dir} is full ({config.staging_cap} bytes cap)")
    return open_layer(config, label, description)


class SparseWriter:
    """Writes a stream to a staged file, leaving holes for zero chunks."""

    def __init__(self, fd: int, cap: int, what: str, claim: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.cap = cap
        self.what = what
        self.written = 0
        self._claim = claim  # told the bytes held, so staging_cap sees a growing download
        self._claimed = 0

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.cap:
            raise SourceRefused(f"{self.what} exceeds the cap of {self.cap} bytes")
        view = memoryview(data)
        for start in range(0, len(view), COPY_CHUNK):
            piece = view[start : start + COPY_CHUNK]
            if piece != memoryview(ZERO_CHUNK)[: len(piece)]:
                os.pwrite(self.fd, piece, self.written + start)
        self.written += len(data)
        if self._claim is not None and self.written - self._claimed >= CLAIM_STEP:
            self._claim(self.written)
            self._claimed = self.written

    def finish(self) -> None:
        os.ftruncate(self.fd, self.written)
        os.fsync(self.fd)


# -- URLs ------------------------------------------------------------------


def _host_allowed(host: str, config: ImportConfig) -> None:
    lowered = host.lower().rstrip(".")
    if any(fnmatch.fnmatch(lowered, pattern.lower()) for pattern in config.denied_hosts):
        raise SourceRefused(f"host {host!r} is denied")
    if config.allowed_hosts and not any(fnmatch.fnmatch(lowered, pattern.lower()) for pattern in config.allowed_hosts):
        raise SourceRefused(f"host {host!r} is not in the allowed hosts")


def _address_refusal(address: str, config: ImportConfig) -> str | None:
    """None when the address may be connected to, else why not."""
    return addresses.judge(tuple(config.denied_networks), tuple(config.allowed_networks)).refusal(address)


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
        raise SourceUnavailable(f"cannot resolve {host!r}: {error}") from error
    resolved = sorted({str(info[4][0]) for info in infos})
    denied = [reason for address in resolved if (reason := _address_refusal(address, config)) is not None]
    if denied:
        # Any denied address refuses the host: DNS could hand out either.
        raise SourceRefused(f"{host!r} resolves to a denied address ({', '.join(denied)})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path, resolved[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address; every receive is paced."""

    def __init__(self, host: str, port: int, address: str, pacer: transfer.Pacer) -> None:
        super().__init__(host, port)
        self._address = address
        self._pacer = pacer

    def connect(self) -> None:
        self.sock = transfer.connect(self._address, self.port, self._pacer)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        raw = transfer.connect(self._address, self.port, self._pacer)
        # Certificate checked against the host name, connection to the checked address.
        self.sock = transfer.start_tls(raw, self.host, ssl.create_default_context(), self._pacer)


def _open_url(
    url: str, config: ImportConfig, pacer: transfer.Pacer
) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path, address = check_url(current, config)
        connection_class = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = connection_class(host, port, address, pacer)
        try:
            connection.request("GET", path, headers={"User-Agent": "diskpipe", "Accept-Encoding": "identity"})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException, transfer.TransferTooSlow) as error:
            connection.close()
            raise SourceUnavailable(f"cannot fetch {current!r}: {error}") from error
        if response.status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            connection.close()
            if not location:
                raise SourceRefused(f"{current!r}: redirect without a location")
            current = urljoin(current, location)
            continue
        if response.status != 200:
            connection.close()
            if response.status >= 500 or response.status == 429:
                raise SourceUnavailable(f"{current!r}: HTTP {response.status}")
            raise SourceRefused(f"{current!r}: HTTP {response.status} {response.reason!r}")
        return response, connection
    raise SourceRefused(f"{url!r}: more than {MAX_REDIRECTS} redirects")


def transfer_limits(config: ImportConfig) -> transfer.TransferLimits:
    return transfer.TransferLimits(
        total=config.download_timeout,
        idle=config.read_timeout,
        connect=config.connect_timeout,
        min_rate=config.min_rate,
        window=config.min_rate_window,
    )


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
    # One clock for the whole transfer: connecting, TLS, headers, redirects, body.
    pacer = transfer.Pacer(transfer_limits(config))
    response, connection = _open_url(url, config, pacer)
    try:
        staged = open_download_file(config, label, url)
    except BaseException:
        connection.close()
        raise
    try:
        _receive(response, staged, url, config, _Receiving(claimed, policy, cancelled, progress))
    except BaseException:
        staged.close()
        raise
    finally:
        connection.close()
    return staged


@dataclass(frozen=True, slots=True)
class _Receiving:
    """What a download checks and reports while its bytes arrive."""

    claimed: str | None
    policy: Policy
    cancelled: Callable[[], bool]
    progress: Callable[[int, int | None], None] | None


def _response_chunks(response: http.client.HTTPResponse, url: str, cancelled: Callable[[], bool]) -> Iterator[bytes]:
    while True:
        if cancelled():
            raise InterruptedError("download cancelled")
        try:
            # The pacer bounds each receive inside this read.
            chunk = response.read(COPY_CHUNK)
        except transfer.TransferTooSlow as error:
            raise SourceUnavailable(f"download of {url!r} cut off: {error}") from error
        except (OSError, http.client.HTTPException) as error:
            raise SourceUnavailable(f"download of {url!r} failed: {error}") from error
        if not chunk:
            return
        yield chunk


def _receive(
    response: http.client.HTTPResponse, staged: Staged, url: str, config: ImportConfig, receiving: _Receiving
) -> None:
    length_header = response.getheader("Content-Length")
    expected = int(length_header) if length_header and length_header.isdigit() else None
    if expected is not None and expected > config.max_download:
        raise SourceRefused(f"{url!r} is {expected} bytes, above the cap of {config.max_download}")
    writer = SparseWriter(staged.fd, config.max_download, f"download of {url!r}", getattr(staged, "claim", None))
    # The inspector sees every byte as it arrives, and what the head
    # decides (a claim that cannot match, a hidden format...) aborts the
    # download. Compressed data and OVAs are judged after unpacking; the
    # full verdict is always taken again on the staged file.
    inspector = StreamInspector()
    head = HeadCheck(inspector, receiving.claimed, receiving.policy, unpacked_later=True)
    for chunk in _response_chunks(response, url, receiving.cancelled):
        head.feed(chunk)
        writer.write(chunk)
        if receiving.progress is not None:
            receiving.progress(writer.written, expected)
    if expected is not None and writer.written != expected:
        raise SourceUnavailable(f"download of {url!r} ended after {writer.written} of {expected} bytes")
    writer.finish()
    if inspector.undecided is not None:
        # Not a refusal: the full verdict on the staged file decides.
        staged.stream_notes = (f"stream could not decide: {inspector.undecided}; the staged file was judged",)


# -- unpacking ---------------------------------------------------------------


def unpack(
    staged: Staged, config: ImportConfig, label: str, *, max_virtual_size: int | None = None
) -> tuple[Staged, ImageInfo]:
    """Inspect staged data; unpack compressed data and OVAs under the caps
    of `diskpipe.jobs.unpacking`. Returns the data to convert and its facts."""
    from diskpipe.jobs import unpacking

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
    from diskpipe.jobs.unpacking import remove_void_claims

    return removed + remove_void_claims(config.staging_dir)
