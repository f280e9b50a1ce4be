"""Where imports come from: local paths only under import directories, URLs
through allow/deny lists (no server-side request forgery), downloads that
are validated while they arrive and capped, compressed uploads and OVAs
unpacked as streams; and the embedded (no server) import."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from diskpipe.config import load
from diskpipe.converter.stores.file import FileStore
from diskpipe.formats.policy import Policy
from diskpipe.jobs import sources
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords
from diskpipe.validation import UnsafeImage
from tests.adversarial import compressed
from tests.conftest import ROOT


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect-to-metadata"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        if self.path.startswith("/redirect-local"):
            self.send_response(302)
            self.send_header("Location", "/files/" + self.path.split("/", 2)[2])
            self.end_headers()
            return
        if self.path.startswith("/endless"):
            self.send_response(200)
            self.end_headers()
            # /endless-data sends bytes that are not zero (no holes to hide in).
            block = bytes(1 << 20) if self.path == "/endless" else os.urandom(1 << 20)
            try:
                while True:
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                return
        super().do_GET()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("web")
    (root / "files").mkdir()
    handler = lambda *args: _Handler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root / "files"
    server.shutdown()


def allowing(port: int, tmp_path: Path, **changes: Any) -> sources.ImportConfig:
    """Loopback is denied by default; these tests allow exactly the test server."""
    base: dict[str, Any] = {
        "allowed_ports": (port,),
        "allowed_networks": ("127.0.0.1/32",),
        "staging_dir": str(tmp_path / "staging"),
    }
    base.update(changes)
    return sources.ImportConfig(**base)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def environment(tmp_path: Path, config: sources.ImportConfig) -> Environment:
    return Environment(
        records=SqliteRecords(str(tmp_path / "records.sqlite")),
        store=FileStore(tmp_path / "store"),
        policy=Policy(),
        import_config=config,
    )


def publish(directory: Path, name: str, data: bytes) -> str:
    (directory / name).write_bytes(data)
    return f"/files/{name}"


@pytest.fixture
def qcow2_bytes(samples_dir: Path, manifest: list[Any]) -> bytes:
    entry = next(entry for entry in manifest if entry.name == "qcow2-data-offsets")
    return (samples_dir / entry.file).read_bytes()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.org/disk.img", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("http://user:secret@example.org/disk.img", "credentials"),
        ("http://127.0.0.1/disk.img", "denied address"),
        ("http://localhost/disk.img", "denied address"),
        ("http://[::1]/disk.img", "denied address"),
        ("http://10.1.2.3/disk.img", "denied address"),
        ("http://169.254.169.254/latest/meta-data/", "denied address"),
        ("http://0x7f000001/disk.img", "denied address"),
        ("http://example.org:22/disk.img", "port 22"),
    ],
)
def test_urls_are_checked_before_any_connection(url: str, reason: str) -> None:
    with pytest.raises(sources.SourceRefused, match=reason):
        sources.check_url(url, sources.ImportConfig())


def test_host_allow_and_deny_lists() -> None:
    config = sources.ImportConfig(allowed_hosts=("*.images.example",), allowed_networks=("127.0.0.0/8",))
    with pytest.raises(sources.SourceRefused, match="not in the allowed hosts"):
        sources.check_url("http://localhost/x", config)
    config = sources.ImportConfig(denied_hosts=("localhost",), allowed_networks=("127.0.0.0/8",))
    with pytest.raises(sources.SourceRefused, match="is denied"):
        sources.check_url("http://LOCALHOST./x", config)


def test_a_url_import_is_denied_on_loopback_by_default(
    web: tuple[str, Path], tmp_path: Path, qcow2_bytes: bytes
) -> None:
    url, files = web
    path = publish(files, "disk.qcow2", qcow2_bytes)
    config = sources.ImportConfig(allowed_ports=(port_of(url),), staging_dir=str(tmp_path / "staging"))
    record = run_import(ImportJob("denied", url + path), environment(tmp_path, config), "a1")
    assert record["status"] == "killed" and "denied address" in record["reason"]


def test_a_url_import_reaches_active_and_stages_nothing_afterwards(
    web: tuple[str, Path], tmp_path: Path, qcow2_bytes: bytes
) -> None:
    url, files = web
    path = publish(files, "disk2.qcow2", qcow2_bytes)
    config = allowing(port_of(url), tmp_path)
    record = run_import(ImportJob("from-web", url + path, claimed_format="qcow2"), environment(tmp_path, config), "a1")
    assert record["status"] == "active", record
    assert os.listdir(tmp_path / "staging") == []


def test_a_redirect_to_a_denied_address_is_refused(web: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = web
    config = allowing(port_of(url), tmp_path, allowed_ports=(port_of(url), 80))
    with pytest.raises(sources.SourceRefused, match="denied address"):
        sources.download(url + "/redirect-to-metadata", config, claimed=None, policy=Policy(), label="r")


def test_a_redirect_to_an_allowed_place_is_followed(web: tuple[str, Path], tmp_path: Path, qcow2_bytes: bytes) -> None:
    url, files = web
    publish(files, "redirected.qcow2", qcow2_bytes)
    staged = sources.download(
        url + "/redirect-local/redirected.qcow2",
        allowing(port_of(url), tmp_path),
        claimed="qcow2",
        policy=Policy(),
        label="r",
    )
    try:
        assert os.fstat(staged.fd).st_size == len(qcow2_bytes)
    finally:
        staged.close()
    assert not os.path.exists(staged.path)


def test_a_download_refuses_early_when_the_claim_cannot_match(
    web: tuple[str, Path], tmp_path: Path, qcow2_bytes: bytes
) -> None:
    url, files = web
    path = publish(files, "claimed-raw.qcow2", qcow2_bytes)
    with pytest.raises(UnsafeImage) as refusal:
        sources.download(url + path, allowing(port_of(url), tmp_path), claimed="raw", policy=Policy(), label="c")
    assert [issue.check for issue in refusal.value.issues] == ["claimed_format"]
    assert os.listdir(tmp_path / "staging") == []


def test_downloads_are_capped(web: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = web
    config = allowing(port_of(url), tmp_path, max_download=8 << 20)
    with pytest.raises(sources.SourceRefused, match="exceeds the cap"):
        sources.download(url + "/endless", config, claimed=None, policy=Policy(), label="e")
    assert os.listdir(tmp_path / "staging") == []


KILLED_DOWNLOAD = """
import sys
from diskpipe.formats.policy import Policy
from diskpipe.jobs import sources
config = sources.ImportConfig(staging_dir=sys.argv[2], allowed_ports=(int(sys.argv[3]),),
                              allowed_networks=("127.0.0.1/32",), max_download=1 << 40)
def progress(done, total):
    if done >= 64 << 20:
        print("downloading", flush=True)
sources.download(sys.argv[1], config, claimed=None, policy=Policy(), label="killed", progress=progress)
"""


def test_a_download_killed_midway_leaves_no_data_in_staging(web: tuple[str, Path], tmp_path: Path) -> None:
    """A download is staged in an anonymous file: SIGKILL of the worker
    mid-transfer leaves no data, only an empty claim that cleanup removes."""
    url, _ = web
    staging = tmp_path / "staging"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_DOWNLOAD, url + "/endless-data", str(staging), str(port_of(url))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "downloading"
    assert sum(entry.stat().st_size for entry in staging.iterdir()) >= 64 << 20  # the claim saw the data
    child.kill()
    child.wait(timeout=60)
    child.stdout.close()
    assert sum(entry.stat().st_blocks for entry in staging.iterdir()) == 0
    sources.cleanup_staging(sources.ImportConfig(staging_dir=str(staging)))
    assert os.listdir(staging) == []


def test_a_missing_file_is_refused_not_retried(web: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = web
    with pytest.raises(sources.SourceRefused, match="404"):
        sources.download(
            url + "/files/nothing-here", allowing(port_of(url), tmp_path), claimed=None, policy=Policy(), label="m"
        )


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2", "zstd"])
def test_compressed_uploads_are_unpacked_then_judged(
    kind: str, web: tuple[str, Path], tmp_path: Path, qcow2_bytes: bytes
) -> None:
    url, files = web
    path = publish(files, f"disk.qcow2.{kind}", compressed(kind, qcow2_bytes))
    env = environment(tmp_path, allowing(port_of(url), tmp_path))
    record = run_import(ImportJob(f"packed-{kind}", url + path, claimed_format="qcow2"), env, "a1")
    assert record["status"] == "active", record
    assert record["unpacked"] == [kind]
    assert record["source_format"] == "qcow2"


def test_unpacking_is_capped(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb") as out:
        for _ in range(64):
            out.write(bytes(1 << 20))
    config = sources.ImportConfig(
        allowed_dirs=(str(tmp_path),), staging_dir=str(tmp_path / "staging"), max_decompressed=16 << 20
    )
    staged = sources.open_local(str(bomb), config)
    try:
        with pytest.raises(sources.SourceRefused, match="exceeds the cap"):
            sources.unpack(staged, config, "bomb")
    finally:
        staged.close()
    assert os.listdir(tmp_path / "staging") == []


def test_an_ova_gives_up_the_disk_its_ovf_names(tmp_path: Path, samples_dir: Path, manifest: list[Any]) -> None:
    disk = (samples_dir / next(entry for entry in manifest if entry.name == "vmdk-stream-data").file).read_bytes()
    ovf = (
        b'<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
        b'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>'
        b'<File ovf:id="file1" ovf:href="disk1.vmdk"/></References>'
        b'<DiskSection><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1"/></DiskSection></Envelope>'
    )
    ova = tmp_path / "appliance.ova"
    with tarfile.open(ova, "w") as archive:
        for name, data in (("appliance.ovf", ovf), ("notes.txt", b"hello"), ("disk1.vmdk", disk)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    env = environment(
        tmp_path, sources.ImportConfig(allowed_dirs=(str(tmp_path),), staging_dir=str(tmp_path / "staging"))
    )
    record = run_import(ImportJob("from-ova", str(ova), claimed_format="vmdk"), env, "a1")
    assert record["status"] == "active", record["reason"]
    assert record["unpacked"] == ["ova"] and record["source_format"] == "vmdk"


def test_local_paths_stay_inside_the_import_directories(tmp_path: Path, qcow2_bytes: bytes) -> None:
    allowed = tmp_path / "imports"
    allowed.mkdir()
    (allowed / "ok.qcow2").write_bytes(qcow2_bytes)
    (allowed / "escape").symlink_to("/etc/passwd")
    config = sources.ImportConfig(allowed_dirs=(str(allowed),), staging_dir=str(tmp_path / "staging"))
    staged = sources.open_local(str(allowed / "ok.qcow2"), config)
    staged.close()
    for path in ("/etc/shadow", str(allowed / "escape"), str(allowed / ".." / "imports" / ".." / "x")):
        with pytest.raises(sources.SourceRefused):
            sources.open_local(path, config)
    with pytest.raises(sources.SourceRefused, match="disabled"):
        sources.open_local(str(allowed / "ok.qcow2"), sources.ImportConfig())


def test_a_directory_swapped_for_a_symlink_after_the_check_leads_nowhere(tmp_path: Path) -> None:
    """open_local resolves and checks the path, then opens it one component
    at a time beneath the import directory: a directory on the checked path
    that became a symlink (a submitter racing the check) fails to open
    instead of leading out of the tree. The swap is made before the walk,
    which is the state the race would leave."""
    allowed = tmp_path / "imports"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "disk.raw").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "disk.raw").write_bytes(b"secret")
    fd = sources.open_beneath(str(allowed), "sub/disk.raw")
    assert os.read(fd, 16) == b"inside"
    os.close(fd)
    (allowed / "sub").rename(tmp_path / "moved")
    (allowed / "sub").symlink_to(outside)
    with pytest.raises(OSError):
        sources.open_beneath(str(allowed), "sub/disk.raw")
    for relative in ("../outside/disk.raw", "", "sub/../../outside/disk.raw"):
        with pytest.raises(OSError):
            sources.open_beneath(str(allowed), relative)


def test_the_embedded_import_needs_no_server(tmp_path: Path, samples_dir: Path, manifest: list[Any]) -> None:
    entry = next(entry for entry in manifest if entry.name == "vmdk-stream-data")
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"))
    env.pop("DISKPIPE_BROKER_URL", None)
    env.pop("DISKPIPE_CONFIG", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "diskpipe", *args], env=env, capture_output=True, text=True, check=False
        )

    done = cli("import", str(samples_dir / entry.file), "--id", "local-1", "--output=json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "active" and record["locations"][0]["url"].startswith("file://")
    assert json.loads(cli("status", "local-1", "--output=json").stdout)["status"] == "active"
    assert "local-1" in cli("list").stdout
    refused = cli(
        "import",
        str(samples_dir / next(e for e in manifest if e.name == "hostile-qcow2-data-file").file),
        "--id",
        "local-2",
    )
    assert refused.returncode == 1 and "data_file" in refused.stdout
    stored = list((tmp_path / "data" / "diskpipe" / "images").iterdir())
    assert [path.name for path in stored] == ["local-1.raw"]


def test_a_hard_link_into_an_import_directory_is_refused(tmp_path: Path, qcow2_bytes: bytes) -> None:
    allowed = tmp_path / "imports"
    allowed.mkdir()
    outside = tmp_path / "private" / "secret.qcow2"
    outside.parent.mkdir()
    outside.write_bytes(qcow2_bytes)
    os.link(outside, allowed / "linked.qcow2")
    config = sources.ImportConfig(allowed_dirs=(str(allowed),), staging_dir=str(tmp_path / "staging"))
    with pytest.raises(sources.SourceRefused, match="2 hard links"):
        sources.open_local(str(allowed / "linked.qcow2"), config)
    # Through a worker's import: refused, with the reason on the record.
    record = run_import(ImportJob("linked", str(allowed / "linked.qcow2")), environment(tmp_path, config), "a1")
    assert record["status"] == "killed" and "hard links" in record["reason"]
    # An operator who knows the links may accept them.
    staged = sources.open_local(str(allowed / "linked.qcow2"), replace(config, allow_hard_links=True))
    assert os.read(staged.fd, 4) == b"QFI\xfb"
    staged.close()
    # Once the other name is gone, the file is an ordinary import.
    outside.unlink()
    sources.open_local(str(allowed / "linked.qcow2"), config).close()


def test_allow_hard_links_comes_from_the_import_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "diskpipe.toml"
    config.write_text("[import]\nallow_hard_links = true\n")
    assert load(sources.ImportConfig, str(config)).allow_hard_links
    config.write_text("[import]\n")
    assert not load(sources.ImportConfig, str(config)).allow_hard_links
    monkeypatch.setenv("DISKPIPE_IMPORT_ALLOW_HARD_LINKS", "yes")
    assert load(sources.ImportConfig, str(config)).allow_hard_links


def test_a_url_cannot_forge_lines_in_messages_and_logs(tmp_path: Path) -> None:
    """urlsplit drops tabs and line breaks, so such a URL passes the checks;
    every message quotes the URL as the submitter wrote it (repr), so a
    tenant cannot write a forged line into the record or the worker log."""
    config = sources.ImportConfig(
        staging_dir=str(tmp_path / "staging"), allowed_ports=(1,), allowed_networks=("127.0.0.1/32",)
    )
    url = "http://127.0.0.1:1/x\n[2026-01-01 00:00:00,000: ERROR/MainProcess] image victim: FORGED\r"
    with pytest.raises((sources.SourceUnavailable, sources.SourceRefused)) as failure:
        sources.download(url, config, claimed=None, policy=Policy(), label="forge")
    assert "\n" not in str(failure.value) and "\r" not in str(failure.value)
