"""qemu-img never sees a name a user chose.

A file whose *name* is a qemu filename (`json:{...}` with JSON escapes
instead of `/`, `nbd:`, `file:`, `ssh://`, `http://`) holds harmless zeros;
qemu-img, given that name, would read another host file or connect to
127.0.0.1. Through `diskpipe convert`, the embedded `diskpipe import` and
`convert_image`, the stored bytes must be the zeros that were inspected, and
a listener on 127.0.0.1 must see no connection. A source renamed over after
inspection changes nothing; image ids that are not plain names are usage
errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter import qemu_img
from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.limits import convert_limits
from diskpipe.converter.stores.file import FileStore
from tests.conftest import ROOT

SIZE = 1 << 20
SECRET = (b"host secret, not the uploaded image\n" * (SIZE // 36 + 1))[:SIZE]
DECOY = (b"renamed over the source after inspection\n" * (SIZE // 41 + 1))[:SIZE]
URL_SHAPED = ("nbd-url", "ssh", "http")


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections and closes each at
    once (so a qemu client fails fast instead of waiting for a handshake)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _take_one(self) -> None:
        connection, _ = self.sock.accept()
        connection.close()
        self.connections += 1

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self._take_one()

    def finish(self) -> int:
        """Every connection ever made: the thread's, plus any still queued in
        the kernel (a finished client's connect has completed by then)."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._take_one()
        self.sock.close()
        self.finished = True
        return self.connections


@pytest.fixture
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    if not found.finished:
        found.finish()


def json_escaped(path: Path) -> str:
    """A path inside a JSON string with every `/` written as \\u002f, so it
    fits in a single file name."""
    return str(path).replace("/", "\\u002f")


def hostile_name(label: str, port: int, secret: Path) -> str:
    """A relative name qemu reads as something else than the file."""
    nbd_server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
    names = {
        # The secret's path goes in after json.dumps, which would double the backslashes.
        "json-file": "json:" + json.dumps({"driver": "raw", "file": {"driver": "file", "filename": "@"}}),
        "json-flat": 'json:{"file.driver":"file","file.filename":"@"}',
        "json-nbd": "json:" + json.dumps({"driver": "raw", "file": {"driver": "nbd", "server": nbd_server}}),
        "nbd": f"nbd:127.0.0.1:{port}",
        "nbd-url": f"nbd://127.0.0.1:{port}/x",
        "file": "file:secret",  # qemu strips `file:` and opens ./secret
        "ssh": f"ssh://127.0.0.1:{port}/x",
        "http": f"http://127.0.0.1:{port}/x",
    }
    return names[label].replace("@", json_escaped(secret))


LABELS = ("json-file", "json-flat", "json-nbd", "nbd", "nbd-url", "file", "ssh", "http")


def make_source(work: Path, name: str, contents: str) -> Path:
    """Write the harmless image under `name` (relative to `work`; a URL-shaped
    name becomes nested directories, which is what the path means)."""
    path = work / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if contents == "raw":
        with open(path, "wb") as handle:
            handle.truncate(SIZE)
    else:
        # Made under a plain name and renamed: qemu must not see the hostile one.
        plain = work / "plain.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), str(SIZE)], check=True)
        plain.rename(path)
    return path


def hostile_source(
    label: str, tmp_path: Path, work: Path, listener: Listener, contents: str = "raw"
) -> tuple[str, Path]:
    """The harmless image under the hostile name `label` makes, pointing at
    the listener and the host secret: the name and the image's path."""
    name = hostile_name(label, listener.port, tmp_path / "host-secret")
    return name, make_source(work, name, contents)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with the host secret under the names the hostile sources point at."""
    directory = tmp_path / "work"
    directory.mkdir()
    (tmp_path / "host-secret").write_bytes(SECRET)
    (directory / "secret").write_bytes(SECRET)
    return directory


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT)))
    env.pop("DISKPIPE_CONFIG", None)
    env.pop("DISKPIPE_BROKER_URL", None)
    return env


def diskpipe(tmp_path: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diskpipe", *args],
        cwd=cwd,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def cli_into_file_store(
    tmp_path: Path, cwd: Path, listener: Listener, *args: str, exit_code: int = 0
) -> dict[str, Any]:
    """`diskpipe ARGS` run from `cwd` into the file store tmp_path/store with
    JSON output: it must exit `exit_code` without connecting to the
    listener. What it printed."""
    done = diskpipe(tmp_path, cwd, *args, "--store", f"file:{tmp_path / 'store'}", "--output=json")
    assert listener.finish() == 0, f"something connected to 127.0.0.1 for {args!r}"
    assert done.returncode == exit_code, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def stored_bytes(location: dict[str, Any]) -> bytes:
    return Path(location["metadata"]["path"]).read_bytes()


def assert_zeros_stored(data: bytes) -> None:
    assert data != SECRET[: len(data)], "qemu-img read the host secret instead of the image"
    assert data == bytes(SIZE), "the stored image is not the inspected one"


# -- diskpipe convert ------------------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("contents", ["raw", "qcow2"])
def test_convert_cli_stores_the_bytes_a_qemu_named_file_holds(
    label: str, contents: str, tmp_path: Path, work: Path, listener: Listener
) -> None:
    name, _ = hostile_source(label, tmp_path, work, listener, contents)
    result = cli_into_file_store(tmp_path, work, listener, "convert", name, "--id", "img")
    assert result["source_format"] == contents
    assert_zeros_stored(stored_bytes(result["locations"][0]))


def test_convert_cli_with_an_absolute_path(tmp_path: Path, work: Path, listener: Listener) -> None:
    _, source = hostile_source("json-file", tmp_path, work, listener)
    result = cli_into_file_store(tmp_path, tmp_path, listener, "convert", str(source))
    assert_zeros_stored(stored_bytes(result["locations"][0]))


# -- diskpipe import (embedded) --------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("spelling", ["relative", "absolute"])
def test_import_cli_stores_the_bytes_a_qemu_named_file_holds(
    label: str, spelling: str, tmp_path: Path, work: Path, listener: Listener
) -> None:
    name, _ = hostile_source(label, tmp_path, work, listener)
    # Typed as is (pathlib would fold `//`); `./` or `/` marks a path: a bare
    # `http://...` is a URL to download (below).
    typed = f"{work}/{name}" if spelling == "absolute" else "./" + name
    record = cli_into_file_store(tmp_path, work, listener, "import", typed, "--id", "img")
    assert record["status"] == "active"
    assert_zeros_stored(stored_bytes(record["locations"][0]))


@pytest.mark.parametrize("label", URL_SHAPED)
def test_import_cli_takes_a_bare_url_shaped_name_as_a_url_and_does_not_connect(
    label: str, tmp_path: Path, work: Path, listener: Listener
) -> None:
    name, _ = hostile_source(label, tmp_path, work, listener)
    record = cli_into_file_store(tmp_path, work, listener, "import", name, "--id", "img", exit_code=1)
    assert record["status"] == "killed"
    store = tmp_path / "store"
    assert not store.exists() or not list(store.iterdir())


# -- the Python API --------------------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
def test_convert_image_stores_the_bytes_a_qemu_named_file_holds(
    label: str, tmp_path: Path, work: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, _ = hostile_source(label, tmp_path, work, listener)
    monkeypatch.chdir(work)
    try:
        result = convert_image(ConvertRequest(name, "img"), FileStore(tmp_path / "store"))
    finally:
        connections = listener.finish()
    assert connections == 0
    assert_zeros_stored(Path(result.location.metadata["path"]).read_bytes())


def test_a_source_renamed_over_after_inspection_changes_nothing(
    tmp_path: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_source(work, "upload.img", "raw")
    decoy = work / "decoy.img"
    decoy.write_bytes(DECOY)
    swapped: list[str] = []

    def swap_after_inspection(stage: str, percent: float) -> None:
        # "convert" is reported after inspection and qemu-img's cross-check,
        # just before the conversion starts.
        if stage == "convert" and not swapped:
            os.rename(decoy, source)
            swapped.append(stage)

    monkeypatch.chdir(work)
    result = convert_image(
        ConvertRequest("upload.img", "img"), FileStore(tmp_path / "store"), progress=swap_after_inspection
    )
    assert swapped and source.read_bytes() == DECOY
    stored = Path(result.location.metadata["path"]).read_bytes()
    assert stored == bytes(SIZE), "the bytes converted are not the bytes inspected"


class SwappingStore(FileStore):
    """A file store that renames the decoy over the source when the
    conversion begins its target: after inspection, beside qemu-img's
    cross-check (which reads the descriptor too)."""

    def __init__(self, directory: Path, decoy: Path, source: Path) -> None:
        super().__init__(directory)
        self.decoy, self.source = decoy, source

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> Any:
        os.rename(self.decoy, self.source)
        return super().begin(image_id, size, image_format=image_format)


def test_an_import_converts_the_descriptor_it_inspected(tmp_path: Path, work: Path) -> None:
    from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
    from diskpipe.jobs.records import SqliteRecords
    from diskpipe.jobs.sources import ImportConfig

    source = make_source(work, "upload.img", "raw")
    decoy = work / "decoy.img"
    decoy.write_bytes(DECOY)
    environment = Environment(
        records=SqliteRecords(str(tmp_path / "records.sqlite")),
        store=SwappingStore(tmp_path / "store", decoy, source),
        import_config=ImportConfig(allowed_dirs=(str(work),), staging_dir=str(tmp_path / "staging")),
    )
    record = run_import(ImportJob("img", str(source)), environment, "a1")
    assert record["status"] == "active", record
    assert source.read_bytes() == DECOY
    assert stored_bytes(record["locations"][0]) == bytes(SIZE)


def test_no_user_chosen_name_reaches_qemu_img(tmp_path: Path, qemu_img_calls: list[list[str]]) -> None:
    """An encrypted image and its key file under qemu-looking names: every
    qemu-img argument names only descriptors, and the conversion works."""
    passphrase = "diskpipe-test"
    plain = tmp_path / "plain.luks"
    secret = ["--object", f"secret,id=s0,data={passphrase}"]
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "luks", *secret, "-o", "key-secret=s0,iter-time=10", str(plain), str(SIZE)],
        check=True,
    )
    # What qemu decrypts (never-written sectors decrypt to noise, not zeros).
    oracle = tmp_path / "oracle.raw"
    opened = f"driver=luks,key-secret=s0,file.driver=file,file.filename={plain}"
    subprocess.run(["qemu-img", "convert", *secret, "--image-opts", opened, "-O", "raw", str(oracle)], check=True)
    source = tmp_path / "nbd:127.0.0.1:1,x"
    plain.rename(source)
    key = tmp_path / "file:key,id=sec1"
    key.write_text(passphrase, encoding="ascii")
    result = convert_image(ConvertRequest(str(source), "luks-img", key_file=str(key)), FileStore(tmp_path / "store"))
    assert Path(result.location.metadata["path"]).read_bytes() == oracle.read_bytes()
    assert [args[0] for args in qemu_img_calls] == ["info", "convert"]
    for args in qemu_img_calls:
        rendered = " ".join(args)
        assert str(tmp_path) not in rendered, rendered
        assert "/dev/fd/" in rendered


# -- image ids --------------------------------------------------------------------

BAD_IDS = ("../escape", "a/b", "x:conf=/etc/passwd", "img@snap", ".hidden", "-rf", "a..b", "a.tmp.b", "a\nb", "a" * 129)


@pytest.mark.parametrize(
    ("command", "image_id"),
    [("convert", image_id) for image_id in BAD_IDS] + [("import", "../escape"), ("import", "x:conf=/etc/passwd")],
)
def test_the_cli_refuses_an_image_id_that_is_not_a_plain_name(
    command: str, image_id: str, tmp_path: Path, work: Path
) -> None:
    make_source(work, "ok.img", "raw")
    store = tmp_path / "images" / "store"
    done = diskpipe(tmp_path, work, command, "ok.img", "--store", f"file:{store}", f"--id={image_id}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "image id" in done.stderr
    written = [path for path in (tmp_path / "images").rglob("*") if path.is_file()] if store.parent.exists() else []
    assert written == []
    if command == "import":  # refused before the store is opened, and before any record
        assert not (tmp_path / "images").exists()
        listed = diskpipe(tmp_path, work, "list", "--output=json")
        assert json.loads(listed.stdout) == []


def test_the_python_api_and_the_task_refuse_bad_image_ids(tmp_path: Path) -> None:
    from diskpipe.converter.stores.base import InvalidImageId, check_image_id
    from diskpipe.jobs.pipeline import ImportJob
    from diskpipe.tasks.factory import create_app

    import_image = create_app(broker="redis://127.0.0.1:1/0").tasks["diskpipe.import_image"]

    # The task refuses before it touches a record, a store or the source.
    with pytest.raises(InvalidImageId, match="image id"):
        import_image.run(image_id="../escape", source="/x")
    for image_id in BAD_IDS:
        with pytest.raises(InvalidImageId, match="image id"):
            ConvertRequest("x", image_id)
        with pytest.raises(InvalidImageId, match="image id"):
            ImportJob(image_id, "/x")
        with pytest.raises(InvalidImageId):
            FileStore(tmp_path).begin(image_id, SIZE)
    for image_id in ("3f2c5a4e-8d1b-4e0f-9a6b-2c7d8e9f0a1b", "f-qcow2-v3-c64k", "img_1.2", "A"):
        assert check_image_id(image_id) == image_id


def test_image_specs_hold_descriptors_not_names(tmp_path: Path) -> None:
    """No call site can hand qemu-img a path: the spec takes only an open
    descriptor, and renders it inside --image-opts with file.driver=file."""
    path = tmp_path / "json:{}"
    path.write_bytes(bytes(512))
    with pytest.raises((TypeError, ValueError)):
        qemu_img.ImageSpec(str(path), "raw")  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError):
        qemu_img.ImageSpec(fd, "raw")  # a closed descriptor
    with pytest.raises(ValueError):
        qemu_img.TargetSpec(str(path), None, True)
    fd = os.open(path, os.O_RDONLY)
    try:
        spec = qemu_img.ImageSpec(fd, "raw", (("force_size_calc", "current_size"),))
        assert spec.source_args() == [
            "--image-opts",
            f"driver=raw,force_size_calc=current_size,file.driver=file,file.filename=/dev/fd/{fd}",
        ]
        assert spec.pass_fds == (fd,)
        with pytest.raises(ValueError):
            qemu_img.ImageSpec(fd, "raw,file.driver=nbd")
    finally:
        os.close(fd)


def test_a_conversion_never_opens_a_backing_file_even_past_the_policy(tmp_path: Path) -> None:
    """A second lock behind the policy: qemu-img convert is told `backing=`,
    so a backing file that the inspector and the cross-check both missed
    would still not be read. `info` keeps seeing it, for the cross-check."""
    secret = tmp_path / "secret.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(secret), "1M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 64k", str(secret)], check=True, capture_output=True
    )
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "qcow2", str(overlay)], check=True
    )
    out = tmp_path / "out.raw"
    source_fd = os.open(overlay, os.O_RDONLY)
    target_fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        spec = qemu_img.ImageSpec(source_fd, "qcow2")
        assert qemu_img.info(spec).get("backing-filename") == str(secret)
        qemu_img.convert(spec, qemu_img.TargetSpec.descriptor(target_fd), "raw", convert_limits(1 << 20, to_file=True))
    finally:
        os.close(source_fd)
        os.close(target_fd)
    assert out.read_bytes() == bytes(1 << 20)
