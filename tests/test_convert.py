"""Conversion into the file store and a real one-node Ceph, against real
qemu-img: byte-identical output, thin RBD images, protected snapshots,
Glance's checksums, and nothing partial left behind after any failure."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter import qemu_img
from diskpipe.converter.convert import ConversionFailed, ConvertRequest, convert_image
from diskpipe.converter.qemu_img import Cancelled, CancelToken
from diskpipe.converter.stores.base import StoreMisconfigured, StoreUnavailable
from diskpipe.converter.stores.file import FileStore
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore, qemu_rbd_target
from diskpipe.refusal import UnsafeImage
from tests.conftest import FAULT_TEST_TIMEOUT, RECOVERY_TIMEOUT, process_alive, qemu_img_children, wait_until

CONVERTIBLE = {"raw", "qcow2", "vpc", "vhdx", "vmdk", "vdi", "qed", "parallels"}
MAX_TEST_SIZE = 256 * 1024 * 1024  # hashing every byte of a 1 TiB disk is for benchmarks


def convertible(manifest: list[Any]) -> list[Any]:
    return [
        sample
        for sample in manifest
        if sample.group == "honest"
        and sample.verdict == "safe"
        and sample.format in CONVERTIBLE
        and sample.virtual_size <= MAX_TEST_SIZE
        and not sample.name.startswith(("luks", "qcow2-encrypt"))
    ]


def reference_raw(path: Path, fmt: str, out: Path, extra: list[str] | None = None) -> Path:
    source = extra or ["-f", fmt, str(path)]
    subprocess.run(["qemu-img", "convert", "-O", "raw", *source, str(out)], check=True, capture_output=True)
    return out


def digest(path: Path) -> tuple[str, str]:
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    with path.open("rb") as handle:
        while chunk := handle.read(4 << 20):
            md5.update(chunk)
            sha512.update(chunk)
    return md5.hexdigest(), sha512.hexdigest()


def reference_for(sample: Any, path: Path, tmp_path: Path) -> Path:
    extra = None
    if sample.format == "vpc":
        from diskpipe.formats import inspect

        info = inspect(path)
        if (
            info.details.get("size-source") == "chs"
            and info.details["footer-current-size"] // 512 * 512 > info.virtual_size
        ):
            extra = ["--image-opts", f"driver=vpc,force_size_calc=current_size,file.filename={path}"]
    return reference_raw(path, sample.format, tmp_path / "reference.raw", extra)


@pytest.fixture
def rbd_store(ceph: Any) -> Any:
    store = RbdStore(RbdConfig(conf=ceph.conf, connect_timeout=10, op_timeout=20))
    yield store
    store.close()


def test_every_format_converts_into_the_file_store_byte_identical(
    manifest: list[Any], samples_dir: Path, tmp_path: Path
) -> None:
    store = FileStore(tmp_path / "store")
    samples = convertible(manifest)
    assert len(samples) >= 15
    for sample in samples:
        path = samples_dir / sample.file
        result = convert_image(ConvertRequest(str(path), f"f-{sample.name}"), store)
        stored = Path(result.location.metadata["path"])
        reference = reference_for(sample, path, tmp_path)
        assert stored.read_bytes() == reference.read_bytes(), sample.name
        assert (result.checksums.md5, result.checksums.sha512) == digest(reference), sample.name
        assert result.checksums.size == reference.stat().st_size
        reference.unlink()
    assert not [entry for entry in (tmp_path / "store").iterdir() if ".tmp." in entry.name]


def test_every_format_converts_into_rbd_thin_and_protected(
    manifest: list[Any], samples_dir: Path, tmp_path: Path, rbd_store: RbdStore, ceph: Any
) -> None:
    samples = convertible(manifest)
    for sample in samples:
        path = samples_dir / sample.file
        image_id = f"r-{sample.name}"
        result = convert_image(ConvertRequest(str(path), image_id), rbd_store)
        assert result.location.url == f"rbd://{rbd_store.fsid()}/rbd/{image_id}/snap"
        exported = tmp_path / "exported.raw"
        ceph.rbd("export", f"rbd/{image_id}@snap", str(exported))
        reference = reference_for(sample, path, tmp_path)
        assert exported.read_bytes() == reference.read_bytes(), sample.name
        with reference.open("rb") as handle:  # only md5: sha512 is the file store test's (same code)
            assert result.checksums.md5 == hashlib.file_digest(handle, "md5").hexdigest()
        # The snapshot's info tells the image's format and features too: one
        # CLI start (~0.4 s, 70 samples) instead of two.
        info = json.loads(ceph.rbd("info", "--format", "json", f"rbd/{image_id}@snap"))
        assert info["format"] == 2 and "layering" in info["features"] and info["protected"] == "true"
        snaps = json.loads(ceph.rbd("snap", "ls", "--format", "json", f"rbd/{image_id}"))
        assert [snap["name"] for snap in snaps] == ["snap"]
        if sample.virtual_size == 0:
            exported.unlink()
            reference.unlink()
            continue  # `rbd du` aborts on an empty image (a Ceph 16 bug)
        # Thin: RBD holds the 4 MiB objects that cover the data extents
        # (qemu-img map) holding any non-zero byte; zero blocks are never written.
        used = json.loads(ceph.rbd("du", "--format", "json", f"rbd/{image_id}"))["images"]
        used_bytes = sum(entry["used_size"] for entry in used)
        extents = json.loads(
            subprocess.run(
                ["qemu-img", "map", "--output=json", "-f", "raw", str(reference)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        objects = set()
        with reference.open("rb") as handle:
            for extent in extents:
                if not extent["data"]:
                    continue
                for number in range(extent["start"] >> 22, ((extent["start"] + extent["length"] - 1) >> 22) + 1):
                    start = max(extent["start"], number << 22)
                    end = min(extent["start"] + extent["length"], (number + 1) << 22)
                    handle.seek(start)
                    if handle.read(end - start).strip(b"\0"):
                        objects.add(number)
        size = reference.stat().st_size
        assert used_bytes == sum(min(4 << 20, size - (number << 22)) for number in objects), sample.name
        exported.unlink()
        reference.unlink()
    # (Images stay: removing a snapshot costs a monitor round of ~1 s each.)
    assert "tmp" not in ceph.rbd("ls")


def test_a_refused_image_never_reaches_qemu_img(
    samples_dir: Path, manifest: list[Any], tmp_path: Path, qemu_img_calls: list[list[str]]
) -> None:
    store = FileStore(tmp_path / "store")
    hostile = [
        sample for sample in manifest if sample.group == "hostile" and sample.verdict != "safe" and not sample.claimed
    ]
    assert hostile
    for sample in hostile:
        with pytest.raises(UnsafeImage):
            convert_image(ConvertRequest(str(samples_dir / sample.file), f"h-{sample.name}"), store)
    assert qemu_img_calls == []
    assert not list((tmp_path / "store").glob("*")) if (tmp_path / "store").exists() else True


def _slow_source(tmp_path: Path) -> Path:
    """A qcow2 with enough random data that converting it takes a moment."""
    raw = tmp_path / "data.raw"
    with raw.open("wb") as handle:
        for _ in range(48):
            handle.write(os.urandom(1 << 20))
    source = tmp_path / "slow.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True)
    raw.unlink()
    return source


@pytest.mark.timeout(FAULT_TEST_TIMEOUT)
@pytest.mark.usefixtures("ceph_recovers")
def test_cancel_kills_qemu_img_and_leaves_nothing(tmp_path: Path, rbd_store: RbdStore, ceph: Any) -> None:
    source = _slow_source(tmp_path)
    token = CancelToken()
    started = threading.Event()

    def progress(stage: str, percent: float) -> None:
        if stage == "convert":
            started.set()

    canceller = threading.Timer(0.05, lambda: started.wait(RECOVERY_TIMEOUT) and token.cancel())
    canceller.daemon = True
    canceller.start()
    with pytest.raises(Cancelled):
        convert_image(
            ConvertRequest(str(source), "cancelled", options=qemu_img.ConvertOptions(coroutines=1)),
            rbd_store,
            progress=progress,
            cancel=token,
        )
    assert "cancelled" not in ceph.rbd("ls")
    assert not qemu_img_children()


KILL_SCRIPT = """
import sys
from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore
store = RbdStore(RbdConfig(conf=sys.argv[3]))
def progress(stage, percent):
    if stage == "convert" and percent > 0:
        print("converting", flush=True)
convert_image(ConvertRequest(sys.argv[1], sys.argv[2]), store, progress=progress)
"""


@pytest.mark.timeout(FAULT_TEST_TIMEOUT)
@pytest.mark.usefixtures("ceph_recovers")
@pytest.mark.parametrize("victim", ["qemu-img", "python"])
def test_a_conversion_killed_midway_leaves_no_image_and_the_next_run_succeeds(
    victim: str, tmp_path: Path, rbd_store: RbdStore, ceph: Any
) -> None:
    source = _slow_source(tmp_path)
    image_id = f"killed-{victim}"
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(source), image_id, ceph.conf], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "converting"
    converters = qemu_img_children(process.pid)
    assert converters
    if victim == "qemu-img":
        for pid in converters:
            os.kill(pid, signal.SIGKILL)
    else:
        process.kill()
    process.wait(timeout=RECOVERY_TIMEOUT)
    # qemu-img dies with its parent (PR_SET_PDEATHSIG).
    wait_until(
        lambda: f"qemu-img {running} still running" if (running := _running(converters)) else None, "qemu-img gone"
    )
    names = ceph.rbd("ls").split()
    assert image_id not in names  # never a half image under the real name
    # The next run cleans the dead owner's temporary and succeeds.
    removed = rbd_store.cleanup()
    assert all(entry.removed and entry.name.startswith(image_id + ".tmp.") for entry in removed)
    assert not [name for name in ceph.rbd("ls").split() if name.startswith(image_id)]
    result = convert_image(ConvertRequest(str(source), image_id), rbd_store)
    assert result.location.url.endswith(f"/{image_id}/snap")
    rbd_store.delete(image_id)


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_alive(pid)]


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        source = tmp_path / "big.qcow2"
        raw = tmp_path / "big.raw"
        raw.write_bytes(os.urandom(32 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True)
        store = FileStore(mount / "store")
        with pytest.raises((StoreUnavailable, ConversionFailed)) as failure:
            convert_image(ConvertRequest(str(source), "full"), store)
        assert "No space left" in str(failure.value)
        assert list((mount / "store").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_unreachable_cluster_is_a_clear_error_within_seconds(tmp_path: Path) -> None:
    conf = tmp_path / "nowhere.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\nauth_client_required = none\n")
    store = RbdStore(RbdConfig(conf=str(conf), connect_timeout=3, op_timeout=3))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.begin("x", 1 << 20)
    assert time.monotonic() - started < 30  # a hang guard, not a speed test


def test_cephx_auth_and_quoted_rbd_options(
    tmp_path: Path, ceph_cephx: Any, manifest: list[Any], samples_dir: Path
) -> None:
    # A keyring path with characters qemu's rbd: syntax must escape.
    odd = tmp_path / "key:ring@dir"
    odd.mkdir()
    keyring = odd / "client.diskpipe.keyring"
    keyring.write_text(Path(ceph_cephx.keyring).read_text())
    config = RbdConfig(conf=ceph_cephx.conf, user="diskpipe", keyring=str(keyring))
    assert "key\\:ring\\@dir" in qemu_rbd_target(config, "img")
    store = RbdStore(config)
    sample = next(sample for sample in convertible(manifest) if sample.format == "qcow2")
    result = convert_image(ConvertRequest(str(samples_dir / sample.file), "cephx-img"), store)
    assert result.location.url.endswith("/cephx-img/snap")
    store.delete("cephx-img")
    wrong = RbdStore(RbdConfig(conf=ceph_cephx.conf, user="nobody", keyring=str(keyring), connect_timeout=5))
    with pytest.raises(StoreMisconfigured, match=r"client\.nobody"):  # a setup mistake, not an outage
        wrong.begin("never", 1 << 20)
