"""diskpipe's import plugin inside a real Glance 33 (gunicorn, SQLite, a file
store and an RBD store on the session's one-node Ceph), driven by the real
`openstack` and `glance` clients: scripts/glance-start.sh builds Glance's
own virtualenv with diskpipe installed in it (a few minutes the first time)
and starts it once for the session.

Which samples: every hostile sample (one per attack), every honest file the
policy refuses by design (archives, text, obsolete and multi-file formats,
empty disks, LUKS2), the encrypted ones, and a representative subset of the
honest images — a few per format and every raw-family claim, none above 64
MiB — so the module runs in a few minutes. The whole corpus, every honest
image included, goes through Glance in benchmarks/glance_import.py, against
Glance's own image_conversion too.

Skipped (with the reason in the test output) only where Glance cannot be
installed: no Python 3.11 or no package index.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.glance_import import (
    Glance,
    GlanceError,
    Outcome,
    Upload,
    claim,
    file_digest,
    glance_import_args,
    reference_digest,
    sample_class,
)
from tests.conftest import Ceph

GLANCE_PORT = int(os.environ.get("DISKPIPE_TEST_GLANCE_PORT", "9310"))
# Glance refuses to store more than this (image_size_cap); the revert test
# converts a small upload into a larger raw image to make storing fail.
SIZE_CAP = 1536 << 20
# [diskpipe] max_virtual_size in Glance's config (diskpipe's default: 2 TiB).
POLICY_CAP_TEXT, POLICY_CAP = "1700M", 1700 << 20
HONEST_SUBSET = (
    "raw-1m-random",
    "raw-513b",
    "qcow2-v2-c64k",
    "qcow2-v3-c64k",
    "qcow2-compressed-zstd",
    "qcow2-v3-c64k-extl2",
    "vmdk-monolithic-sparse",
    "vmdk-stream-data",
    "vhd-dynamic",
    "vhd-fixed-10m3s",
    "vhd-fixed-vbox",
    "vhdx-dynamic",
    "vdi-dynamic",
    "qed-default",
    "parallels-data",
    "iso-eltorito",
    "gpt-2part",
    "mbr-2part",
    "aki-bzimage",
    "ari-cpio-gzip",
    "ami-ext4",
)
PROPERTIES = ("diskpipe_source_format", "diskpipe_source_disk_format", "diskpipe_checks", "diskpipe_version")

pytestmark = pytest.mark.timeout(2400)  # the first test also builds Glance's virtualenv


@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory, ceph: Ceph) -> Iterator[Glance]:
    """One Glance for the session: plugin `diskpipe`, stores `local` (file,
    the default) and `ceph` (rbd)."""
    state = tmp_path_factory.mktemp("glance")
    extra = state.parent / "glance-extra.conf"
    extra.write_text(f"[DEFAULT]\nimage_size_cap = {SIZE_CAP}\n\n[diskpipe]\nmax_virtual_size = {POLICY_CAP_TEXT}\n")
    try:
        started = Glance.start(state, port=GLANCE_PORT, plugins="diskpipe", rbd_conf=ceph.conf, extra_conf=extra)
    except GlanceError as error:
        if "CANNOT INSTALL GLANCE" in str(error):
            pytest.skip(f"Glance cannot be installed on this machine, its tests are skipped: {error}")
        raise
    yield started
    # Keep Glance's logs beside the test's temporary files (stop removes the state).
    shutil.copytree(state / "log", state.parent / "glance-log", dirs_exist_ok=True)
    started.stop()


@pytest.fixture(scope="session")
def corpus(glance: Glance, manifest: list[Any], samples_dir: Path) -> dict[str, tuple[Any, Outcome]]:
    """Every chosen sample imported once with `openstack image create
    --import` (`glance image-create-via-import` for formats the openstack
    client does not offer); sample name -> (sample, outcome)."""
    chosen = [sample for sample in manifest if sample_class(sample) != "honest" or sample.name in HONEST_SUBSET]
    chosen = [sample for sample in chosen if sample_class(sample) != "too-large"]
    outcomes = glance.import_all(
        Upload(f"c-{sample.name}", claim(sample), samples_dir / sample.file) for sample in chosen
    )
    return {sample.name: (sample, outcomes[f"c-{sample.name}"]) for sample in chosen}


def staged_files(glance: Glance) -> list[str]:
    return sorted(entry.name for entry in (glance.state / "data" / "staging").iterdir())


def expected_checks(sample: Any) -> list[str]:
    return ["encrypted"] if sample_class(sample) == "encrypted" else list(sample.checks)


def assert_stored_as_raw(sample: Any, outcome: Outcome, samples_dir: Path, scratch: Path) -> None:
    image = outcome.image
    assert outcome.status == "active", f"{sample.name}: {outcome.status}: {outcome.message}"
    md5, sha512, size = reference_digest(sample, samples_dir / sample.file, scratch)
    assert (image["checksum"], image["os_hash_value"]) == (md5, sha512), f"{sample.name}: stored data differs"
    assert image["size"] == size, sample.name
    if claim(sample) != "iso":  # an ISO's virtual size is Glance's own reading of the ISO volume
        assert image["virtual_size"] == size, sample.name
    claimed = claim(sample)
    raw_family = claimed in ("iso", "aki", "ari", "ami")
    assert image["disk_format"] == (claimed if raw_family else "raw"), sample.name
    assert image["container_format"] == (claimed if claimed in ("aki", "ari", "ami") else "bare"), sample.name
    assert image["diskpipe_source_format"] == sample.format, sample.name
    assert image["diskpipe_checks"] == "passed", sample.name


def test_honest_images_become_active_raw_images_with_the_right_checksum_and_size(
    corpus: dict[str, tuple[Any, Outcome]], samples_dir: Path, tmp_path: Path
) -> None:
    honest = [entry for entry in corpus.values() if sample_class(entry[0]) == "honest"]
    assert {sample.name for sample, _ in honest} == set(HONEST_SUBSET)
    for sample, outcome in honest:
        assert_stored_as_raw(sample, outcome, samples_dir, tmp_path)


def test_hostile_and_unsafe_samples_are_refused_naming_every_failed_check(
    corpus: dict[str, tuple[Any, Outcome]],
) -> None:
    refused = [entry for entry in corpus.values() if sample_class(entry[0]) != "honest"]
    assert sum(1 for sample, _ in refused if sample.group == "hostile") >= 40
    for sample, outcome in refused:
        assert outcome.status != "active", f"{sample.name} became active"
        assert outcome.task.get("status") == "failure", sample.name
        message = outcome.message
        assert message.startswith("diskpipe refused the image: "), f"{sample.name}: {message}"
        for check in expected_checks(sample):
            assert f"{check}: " in message, f"{sample.name}: {check} not named in {message!r}"


def test_a_refused_image_is_queued_with_its_store_failed_and_nothing_half_set(
    corpus: dict[str, tuple[Any, Outcome]], glance: Glance
) -> None:
    for sample, outcome in corpus.values():
        if sample_class(sample) == "honest":
            continue
        image = outcome.image
        assert image["status"] == "queued", sample.name
        assert image["os_glance_failed_import"] == "local", sample.name
        assert not image.get("os_glance_importing_to_stores"), sample.name
        assert image["disk_format"] == claim(sample), sample.name  # the claim, not a converted format
        assert image.get("virtual_size") is None, sample.name
        assert not [key for key in image if key.startswith("diskpipe_")], sample.name
    # Nothing of any import, accepted or refused, stays in the staging area.
    assert staged_files(glance) == []


def test_the_glance_client_imports_and_refuses_through_the_plugin(
    glance: Glance, manifest: list[Any], samples_dir: Path, tmp_path: Path
) -> None:
    by_name = {sample.name: sample for sample in manifest}
    honest, hostile = by_name["vmdk-stream-data"], by_name["hostile-qcow2-data-file"]
    outcomes = {}
    for sample in (honest, hostile):
        upload = Upload(f"g-{sample.name}", claim(sample), samples_dir / sample.file)
        done = glance.glance(*glance_import_args(upload))  # image-create-via-import, glance-direct
        assert done.returncode == 0, done.stderr
        outcomes[sample.name] = glance.settle(upload.name, done.stdout + done.stderr)
    assert_stored_as_raw(honest, outcomes[honest.name], samples_dir, tmp_path)
    refused = outcomes[hostile.name]
    assert refused.status == "queued"
    assert "data_file: qcow2 image keeps its data in an external file: '/etc/hosts'" in refused.message
    shown = glance.glance("task-show", refused.task["id"])
    assert "data_file" in shown.stdout and "failure" in shown.stdout


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 (any free port) for web-download."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_web_download_goes_through_the_plugin_and_a_hostile_url_is_refused(
    glance: Glance, manifest: list[Any], samples_dir: Path, tmp_path: Path
) -> None:
    by_name = {sample.name: sample for sample in manifest}
    honest, hostile = by_name["qcow2-v3-c64k"], by_name["hostile-qcow2-backing-passwd"]
    with serving(samples_dir) as base:
        uploads = [
            Upload(f"w-{sample.name}", claim(sample), uri=f"{base}/{sample.file}") for sample in (honest, hostile)
        ]
        outcomes = glance.import_all(uploads)
    assert_stored_as_raw(honest, outcomes[f"w-{honest.name}"], samples_dir, tmp_path)
    refused = outcomes[f"w-{hostile.name}"]
    assert refused.status == "queued"
    assert refused.task["status"] == "failure"
    assert "backing_file: qcow2 image names a backing file: '/etc/passwd'" in refused.message
    assert not [key for key in refused.image if key.startswith("diskpipe_")]
    assert staged_files(glance) == []
    # The revert left the image importable: its lock is dropped (Glance 33's
    # image_conversion leaves it held after a web-download refusal, setting
    # `queued` twice, and the image then answers "409 Image has active task").
    assert "os_glance_import_task" not in refused.image
    with serving(samples_dir) as base:
        again = glance.glance(
            "image-import", "--import-method", "web-download", "--uri", f"{base}/{honest.file}", refused.image_id
        )
        assert again.returncode == 0, again.stderr
        reimported = glance.settle(refused.name, again.stdout + again.stderr)
    assert_stored_as_raw(honest, reimported, samples_dir, tmp_path)


def test_the_rbd_store_gets_the_converted_image_as_a_protected_snapshot(
    glance: Glance, ceph: Ceph, manifest: list[Any], samples_dir: Path, tmp_path: Path
) -> None:
    sample = next(sample for sample in manifest if sample.name == "vhd-dynamic")
    upload = Upload("r-vhd-dynamic", claim(sample), samples_dir / sample.file)
    done = glance.glance(
        "image-create-via-import",
        "--disk-format",
        upload.disk_format,
        "--container-format",
        "bare",
        "--name",
        upload.name,
        "--import-method",
        "glance-direct",
        "--store",
        "ceph",
        "--file",
        str(upload.path),
    )
    assert done.returncode == 0, done.stderr
    outcome = glance.settle(upload.name, done.stdout + done.stderr)
    assert_stored_as_raw(sample, outcome, samples_dir, tmp_path)
    image = outcome.image
    assert image["stores"] == "ceph"
    # glance_store's rbd driver writes rbd://<fsid>/<pool>/<image>/snap; the
    # fsid is whatever librados reports right after connecting (on this
    # auth-less test cluster often 0000..., before the monmap has arrived).
    assert re.fullmatch(rf"rbd://[0-9a-f-]{{36}}/rbd/{outcome.image_id}/snap", image["direct_url"])
    snapshots = ceph.rbd("snap", "ls", "--format", "json", f"rbd/{outcome.image_id}")
    assert '"protected":"true"' in snapshots.replace(" ", "")
    exported = tmp_path / "exported.raw"
    ceph.rbd("export", f"rbd/{outcome.image_id}@snap", str(exported))
    assert file_digest(exported)[1] == image["os_hash_value"]


def test_copy_image_does_not_run_the_plugin(glance: Glance, manifest: list[Any], samples_dir: Path) -> None:
    sample = next(sample for sample in manifest if sample.name == "vdi-static")
    outcome = glance.import_all([Upload("k-vdi-static", claim(sample), samples_dir / sample.file)])["k-vdi-static"]
    assert outcome.active
    log = glance.state / "log" / "glance-api.log"
    accepted = f"diskpipe: image {outcome.image_id} accepted"
    assert log.read_text().count(accepted) == 1
    done = glance.glance("image-import", "--import-method", "copy-image", "--stores", "ceph", outcome.image_id)
    assert done.returncode == 0, done.stderr
    copied = glance.settle("k-vdi-static", done.stdout)
    assert copied.image["stores"] in ("local,ceph", "ceph,local")
    assert copied.image["os_hash_value"] == outcome.image["os_hash_value"]
    assert log.read_text().count(accepted) == 1  # Glance skips import plugins for copy-image


def test_a_failure_while_storing_reverts_what_the_plugin_set(glance: Glance, tmp_path: Path) -> None:
    """The plugin accepts and converts; Glance then refuses to store the raw
    image (above image_size_cap): the image goes back to what it was, with
    no diskpipe property, and the converted file is gone."""
    small = tmp_path / "grows.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(small), str(SIZE_CAP + (64 << 20))], check=True)
    outcome = glance.import_all([Upload("f-grows", "qcow2", small)])["f-grows"]
    image = outcome.image
    assert outcome.status == "queued", outcome.message
    assert outcome.task["status"] == "failure"
    assert "diskpipe" not in outcome.message  # Glance's own refusal, after the plugin
    assert image["disk_format"] == "qcow2"
    assert image["container_format"] == "bare"
    assert image.get("virtual_size") is None and image.get("size") is None  # Glance's rule for `queued`
    assert image["os_glance_failed_import"] == "local"
    assert not [key for key in image if key.startswith("diskpipe_")]
    assert staged_files(glance) == []


def test_the_diskpipe_section_of_glances_config_sets_the_policy(glance: Glance, tmp_path: Path) -> None:
    """`[diskpipe] max_virtual_size` in glance-image-import.conf means what
    `[policy] max_virtual_size` means in diskpipe's TOML."""
    large = tmp_path / "large.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(large), str(POLICY_CAP + (1 << 20))], check=True)
    outcome = glance.import_all([Upload("p-large", "qcow2", large)])["p-large"]
    assert outcome.status == "queued"
    assert f"virtual_size: virtual size {POLICY_CAP + (1 << 20)} exceeds the limit of {POLICY_CAP} bytes" in (
        outcome.message
    )
