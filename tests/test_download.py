"""Downloads against an attacker who has read the code: every way to write an
internal address is refused, at the first URL and after a redirect, and a
server cannot hold a download open (deadline, idle limit, minimum rate).

Every server here listens on loopback; a tripwire fails the test if the
code under test tries to connect anywhere else.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from diskpipe.config import ConfigError, load
from diskpipe.converter.stores.file import FileStore
from diskpipe.formats.policy import Policy
from diskpipe.jobs import addresses, sources, transfer
from diskpipe.jobs.errors import Transient
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords

# The address-table server binds 127.0.0.2 and only 127.0.0.2/32 is allowed,
# so every spelling of 127.0.0.1 must be refused in both places.
SERVER_ADDRESS = "127.0.0.2"
# How long a misbehaving server keeps misbehaving: longer than every limit
# the tests configure, so only the code under test can end the download early.
HOLD = 45.0


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may open a connection off loopback, whatever the code does."""
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if not ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback:
            raise AssertionError(f"tripwire: a connection to {host} was attempted")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


# -- every spelling of an internal address -----------------------------------

INTERNAL_HOSTS = [
    # IPv6 embeddings of 127.0.0.1 (or another denied IPv4 address)
    ("[::ffff:127.0.0.1]", "IPv4-mapped"),
    ("[::127.0.0.1]", "IPv4-compatible"),
    ("[::ffff:0:7f00:1]", "SIIT"),
    ("[64:ff9b::7f00:1]", "NAT64"),
    ("[64:ff9b:1::a00:1]", "local-use NAT64, /96 form: 10.0.0.1"),
    ("[64:ff9b:1:7f00:0:100::]", "local-use NAT64, /48 form: ambiguous"),
    ("[2002:7f00:1::]", "6to4"),
    ("[2002:a9fe:a9fe::1]", "6to4 of the metadata service"),
    ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "Teredo, client 127.0.0.1"),
    ("[2001:0:a00:1::f7f7:f7f7]", "Teredo, server 10.0.0.1"),
    ("[2001:db8::5efe:7f00:1]", "ISATAP"),
    ("[::ffff:127.0.0.2]", "mapped form of the one allowed address"),
    # IPv6 networks
    ("[fec0::1]", "site-local"),
    ("[fe80::1]", "link-local"),
    ("[fd00::1]", "unique local"),
    ("[ff02::1]", "multicast"),
    ("[::]", "unspecified"),
    ("[::1]", "loopback"),
    # IPv4 networks
    ("0.0.0.0", "this network"),
    ("100.64.0.1", "shared address space"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("169.254.169.254", "metadata service"),
    # IPv4 spellings getaddrinfo accepts
    ("2130706433", "decimal"),
    ("0x7f.1", "hex, short"),
    ("0x7f000001", "hex"),
    ("0177.0.0.1", "octal"),
    ("127.1", "short"),
    ("0251.0376.0251.0376", "octal metadata service"),
    ("167772161", "decimal 10.0.0.1"),
]


class _Redirector(http.server.BaseHTTPRequestHandler):
    """/redirect?to=URL answers 302 to URL; anything else is a small raw disk."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = bytes(64 * 1024)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def redirector() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((SERVER_ADDRESS, 0), _Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _table_config(port: int, tmp_path: Path) -> sources.ImportConfig:
    return sources.ImportConfig(
        allowed_ports=(port,),
        allowed_networks=(f"{SERVER_ADDRESS}/32",),
        staging_dir=str(tmp_path / "staging"),
    )


def _download(url: str, config: sources.ImportConfig) -> sources.Staged:
    return sources.download(url, config, claimed=None, policy=Policy(), label="t")


@pytest.mark.parametrize(("host", "form"), INTERNAL_HOSTS, ids=[form for _, form in INTERNAL_HOSTS])
def test_every_spelling_of_an_internal_address_is_refused_as_the_first_url(
    host: str, form: str, redirector: int, tmp_path: Path
) -> None:
    with pytest.raises(sources.SourceRefused, match="denied address"):
        _download(f"http://{host}:{redirector}/disk.raw", _table_config(redirector, tmp_path))


@pytest.mark.parametrize(("host", "form"), INTERNAL_HOSTS, ids=[form for _, form in INTERNAL_HOSTS])
def test_every_spelling_of_an_internal_address_is_refused_after_a_redirect(
    host: str, form: str, redirector: int, tmp_path: Path
) -> None:
    target = quote(f"http://{host}:{redirector}/disk.raw", safe="")
    with pytest.raises(sources.SourceRefused, match="denied address"):
        _download(f"http://{SERVER_ADDRESS}:{redirector}/redirect?to={target}", _table_config(redirector, tmp_path))
    assert list((tmp_path / "staging").glob("*")) == []


def test_the_redirecting_server_itself_is_reached(redirector: int, tmp_path: Path) -> None:
    """The refusals above are not because the test server is unreachable."""
    target = quote(f"http://{SERVER_ADDRESS}:{redirector}/disk.raw", safe="")
    staged = _download(
        f"http://{SERVER_ADDRESS}:{redirector}/redirect?to={target}", _table_config(redirector, tmp_path)
    )
    staged.close()


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::ffff:127.0.0.1", {"127.0.0.1"}),
        ("::10.0.0.1", {"10.0.0.1"}),
        ("::ffff:0:7f00:1", {"127.0.0.1"}),
        ("64:ff9b::a9fe:a9fe", {"169.254.169.254"}),
        ("64:ff9b:1::c0a8:101", {"192.168.1.1"}),
        ("2002:c0a8:101::1", {"192.168.1.1"}),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", {"65.54.227.120", "127.0.0.1"}),
        ("2001:db8::200:5efe:a00:1", {"10.0.0.1"}),
        ("2606:4700::1111", set()),
    ],
)
def test_embedded_ipv4_addresses_are_decoded(address: str, embedded: set[str]) -> None:
    found = addresses.embedded_ipv4(ipaddress.IPv6Address(address))
    assert {str(inner) for inner in found} == embedded


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "2606:4700::1111", "64:ff9b::5db8:d822", "64:ff9b:1::5db8:d822", "2002:5db8:d822::1",
     "2001:0:5db8:d822::a247:27dd"],
)  # fmt: skip
def test_public_addresses_pass_in_every_form(address: str) -> None:
    """Decoding does not refuse what it should not: each of these embeds (or
    is) the public 93.184.216.34."""
    judge = addresses.judge(sources.DENIED_NETWORKS, ())
    assert judge.refusal(address) is None


def test_an_exception_applies_to_the_address_as_written_not_to_embeddings() -> None:
    judge = addresses.judge(sources.DENIED_NETWORKS, ("10.0.0.0/8",))
    assert judge.refusal("10.1.2.3") is None
    assert judge.refusal("64:ff9b::a01:203") is not None
    judge = addresses.judge(sources.DENIED_NETWORKS, ("64:ff9b::a01:203/128",))
    assert judge.refusal("64:ff9b::a01:203") is None


# -- servers that try to hold a download open ---------------------------------


Behaviour = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A TCP server on 127.0.0.1 that runs `behave` for each connection."""

    def __init__(self, behave: Behaviour) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.behave = behave
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, connection: socket.socket) -> None:
        # OSError: the client hung up, which is what the tests want.
        with connection, contextlib.suppress(OSError):
            self.behave(connection, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.acceptor.join(10)
        self.listener.close()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], RawServer]]:
    servers: list[RawServer] = []

    def start(behave: Behaviour) -> RawServer:
        servers.append(RawServer(behave))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _read_request(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = connection.recv(4096)
        if not piece:
            return
        data += piece


def never_answers(connection: socket.socket, stop: threading.Event) -> None:
    _read_request(connection)
    stop.wait(HOLD)


def silent_after_connect(connection: socket.socket, stop: threading.Event) -> None:
    stop.wait(HOLD)  # not even a TLS handshake


def _trickle(connection: socket.socket, stop: threading.Event, data: bytes) -> None:
    for byte in data[: int(HOLD)]:
        if stop.wait(1.0):
            return
        connection.sendall(bytes([byte]))


def trickles_headers(connection: socket.socket, stop: threading.Event) -> None:
    _read_request(connection)
    _trickle(connection, stop, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 100)


def trickles_body(connection: socket.socket, stop: threading.Event) -> None:
    _read_request(connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
    _trickle(connection, stop, bytes(100))


def slow_redirects(connection: socket.socket, stop: threading.Event) -> None:
    _read_request(connection)
    if not stop.wait(0.8):
        connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n\r\n")


def steady(rate_per_tenth: int, total: int) -> Behaviour:
    def behave(connection: socket.socket, stop: threading.Event) -> None:
        _read_request(connection)
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        sent = 0
        while sent < total and not stop.is_set():
            piece = min(rate_per_tenth, total - sent)
            connection.sendall(bytes(piece))
            sent += piece
            stop.wait(0.1)
        stop.wait(HOLD)  # keep the connection open: the client decides when it has enough

    return behave


def _config(port: int, tmp_path: Path, **limits: Any) -> sources.ImportConfig:
    return sources.ImportConfig(
        allowed_ports=(port,),
        allowed_networks=("127.0.0.1/32",),
        staging_dir=str(tmp_path / "staging"),
        **limits,
    )


DEADLINE_ONLY = {"download_timeout": 2.0, "read_timeout": 30.0, "connect_timeout": 30.0, "min_rate": 0}


@pytest.mark.parametrize(
    ("behave", "scheme"),
    [
        (trickles_headers, "http"),
        (trickles_body, "http"),
        (never_answers, "http"),
        (silent_after_connect, "https"),
        (slow_redirects, "http"),
    ],
    ids=["headers-one-byte-a-second", "body-one-byte-a-second", "no-headers", "no-tls-handshake", "slow-redirects"],
)
def test_a_server_cannot_hold_a_download_past_its_deadline(
    behave: Behaviour, scheme: str, serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    server = serve(behave)
    with pytest.raises(sources.SourceUnavailable, match="download_timeout 2 s reached"):
        _download(f"{scheme}://127.0.0.1:{server.port}/disk.raw", _config(server.port, tmp_path, **DEADLINE_ONLY))
    assert list((tmp_path / "staging").glob("*")) == []


def test_a_server_that_goes_quiet_hits_the_idle_limit(serve: Callable[[Behaviour], RawServer], tmp_path: Path) -> None:
    server = serve(never_answers)
    config = _config(server.port, tmp_path, download_timeout=60.0, read_timeout=1.0, min_rate=0)
    with pytest.raises(sources.SourceUnavailable, match="read_timeout 1 s"):
        _download(f"http://127.0.0.1:{server.port}/disk.raw", config)


def test_a_download_below_the_minimum_rate_is_cut_off(serve: Callable[[Behaviour], RawServer], tmp_path: Path) -> None:
    server = serve(steady(1024, 64 << 20))  # about 10 KiB/s
    config = _config(server.port, tmp_path, download_timeout=60.0, min_rate=64 * 1024, min_rate_window=1.0)
    with pytest.raises(sources.SourceUnavailable, match="below min_rate 65536 bytes/s"):
        _download(f"http://127.0.0.1:{server.port}/disk.raw", config)
    assert list((tmp_path / "staging").glob("*")) == []


def test_a_download_above_the_minimum_rate_completes(serve: Callable[[Behaviour], RawServer], tmp_path: Path) -> None:
    server = serve(steady(64 * 1024, 2 << 20))  # about 640 KiB/s, for about 3 s
    config = _config(server.port, tmp_path, download_timeout=120.0, min_rate=16 * 1024, min_rate_window=1.0)
    staged = _download(f"http://127.0.0.1:{server.port}/disk.raw", config)
    try:
        assert os.fstat(staged.fd).st_size == 2 << 20
    finally:
        staged.close()


def test_the_new_keys_are_read_from_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "diskpipe.toml"
    path.write_text('[import]\nmin_rate = "32K"\nmin_rate_window = 10\n')
    config = load(sources.ImportConfig, str(path))
    assert (config.min_rate, config.min_rate_window) == (32 * 1024, 10.0)
    with pytest.raises(ConfigError, match="min_rate_window"):
        sources.transfer_limits(sources.ImportConfig(min_rate_window=0))


# -- the pacer's arithmetic, on a clock the test moves ----------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limits(**changes: Any) -> transfer.TransferLimits:
    values: dict[str, Any] = {"total": 100.0, "idle": 60.0, "connect": 10.0, "min_rate": 1000, "window": 10.0}
    values.update(changes)
    return transfer.TransferLimits(**values)


def test_the_socket_timeout_is_what_is_left_under_every_limit() -> None:
    clock = Clock()
    pacer = transfer.Pacer(_limits(total=30.0, min_rate=0), clock)
    assert pacer.timeout() == 30.0  # the deadline is nearer than the idle limit
    clock.now += 25
    assert pacer.timeout() == pytest.approx(5.0)
    clock.now += 5
    with pytest.raises(transfer.TransferTooSlow, match="download_timeout 30 s reached"):
        pacer.timeout()


def test_the_rate_is_judged_over_the_last_window_after_the_first() -> None:
    clock = Clock()
    pacer = transfer.Pacer(_limits(), clock)  # 1000 bytes/s over 10 s: 10000 bytes
    for _ in range(20):  # 2000 bytes/s for 20 s
        clock.now += 1
        pacer.received(2000)
    # Nothing more arrives: the window holds 20000 bytes, enough until about
    # half of them have left it (about 5 s from now).
    assert 4.0 <= pacer.timeout() <= 6.0
    clock.now += 6.5
    with pytest.raises(transfer.TransferTooSlow, match="below min_rate 1000 bytes/s"):
        pacer.timeout()


def test_a_slow_start_is_not_judged_before_one_window() -> None:
    clock = Clock()
    pacer = transfer.Pacer(_limits(), clock)
    clock.now += 9
    pacer.received(1)  # far too little, but within the first window
    assert pacer.timeout() == pytest.approx(1.0)  # the check starts at 10 s
    clock.now += 1
    with pytest.raises(transfer.TransferTooSlow, match="below min_rate"):
        pacer.received(1)


def test_a_slow_server_is_a_transient_failure_not_a_bad_image(
    serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    """Retried like a network failure; the last attempt records which limit was hit."""
    server = serve(trickles_body)
    env = Environment(
        records=SqliteRecords(str(tmp_path / "records.sqlite")),
        store=FileStore(tmp_path / "store"),
        policy=Policy(),
        import_config=_config(server.port, tmp_path, **DEADLINE_ONLY),
    )
    job = ImportJob("slow", f"http://127.0.0.1:{server.port}/disk.raw")
    with pytest.raises(Transient, match="download_timeout 2 s reached"):
        run_import(job, env, "a1", final_attempt=False)
    record = run_import(job, env, "a2", final_attempt=True, retries_done=1)
    assert record["status"] == "killed"
    assert (
        record["outcome"] == "failed"
        and record["reason"].startswith("gave up after 1 retry:")
        and "download_timeout 2 s reached" in record["reason"]
    )


@pytest.fixture
def tls_server_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A certificate for 127.0.0.1 that the download's default context trusts."""
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(certificate), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    return context


def over_tls(context: ssl.SSLContext, behave: Behaviour) -> Behaviour:
    def wrapped(connection: socket.socket, stop: threading.Event) -> None:
        connection.settimeout(HOLD)
        with context.wrap_socket(connection, server_side=True) as tls:
            behave(tls, stop)

    return wrapped


def test_an_https_download_completes_and_an_https_trickle_is_cut_off(
    tls_server_context: ssl.SSLContext, serve: Callable[[Behaviour], RawServer], tmp_path: Path
) -> None:
    """The paced TLS socket both delivers data and bounds every TLS read."""
    honest = serve(over_tls(tls_server_context, steady(256 * 1024, 1 << 20)))
    staged = _download(f"https://127.0.0.1:{honest.port}/disk.raw", _config(honest.port, tmp_path))
    try:
        assert os.fstat(staged.fd).st_size == 1 << 20
    finally:
        staged.close()
    trickle = serve(over_tls(tls_server_context, trickles_body))
    with pytest.raises(sources.SourceUnavailable, match="download_timeout 2 s reached"):
        _download(f"https://127.0.0.1:{trickle.port}/disk.raw", _config(trickle.port, tmp_path, **DEADLINE_ONLY))
