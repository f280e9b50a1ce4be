"""What the Glance plugin does to a staged file, without Glance
(diskpipe.glance.staged): refusals name every failed check and write
nothing, accepted containers are converted next to the staged file under a
name of their own, raw data is handed on as uploaded. The same code inside a
real Glance: tests/test_glance.py."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from diskpipe.formats.policy import Issue, Policy
from diskpipe.glance.staged import (
    MESSAGE_LIMIT,
    ImportFailed,
    Settings,
    process,
    refusal_message,
)
from diskpipe.refusal import UnsafeImage

IMAGE_ID = "6f1c1d2e-4a7b-4c55-9d0e-0123456789ab"
# A sample's name -> (its manifest entry, the path it is staged at)
StageSample = Callable[[str], tuple[Any, str]]


def stage(sample: Any, samples_dir: Path, staging: Path) -> str:
    """Copy a sample where Glance stages uploads: <staging>/<image id>."""
    staging.mkdir(exist_ok=True)
    staged = staging / IMAGE_ID
    shutil.copyfile(samples_dir / sample.file, staged)
    return str(staged)


def claim(sample: Any) -> str:
    return str(sample.claimed or sample.disk_format)


def by_name(manifest: list[Any], name: str) -> Any:
    return next(sample for sample in manifest if sample.name == name)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "staging"


@pytest.fixture
def stage_sample(manifest: list[Any], samples_dir: Path, staging: Path) -> StageSample:
    """Stage the sample of that name in `staging`: (its manifest entry, the staged path)."""

    def stage_named(name: str) -> tuple[Any, str]:
        sample = by_name(manifest, name)
        return sample, stage(sample, samples_dir, staging)

    return stage_named


def test_every_hostile_staged_file_is_refused_naming_its_checks_and_nothing_is_written(
    manifest: list[Any], samples_dir: Path, staging: Path
) -> None:
    hostile = [sample for sample in manifest if sample.group == "hostile"]
    assert len(hostile) >= 40
    for sample in hostile:
        staged = stage(sample, samples_dir, staging)
        with pytest.raises(UnsafeImage) as refused:
            process(staged, IMAGE_ID, claim(sample), "bare", Settings(Policy()))
        assert set(sample.checks) <= {issue.check for issue in refused.value.issues}, sample.name
        for check in sample.checks:
            assert f"{check}: " in str(refused.value), sample.name
        assert sorted(entry.name for entry in staging.iterdir()) == [IMAGE_ID], sample.name


def test_an_accepted_container_is_converted_beside_the_staged_file(
    stage_sample: StageSample, staging: Path, tmp_path: Path
) -> None:
    _, staged = stage_sample("vmdk-stream-data")
    accepted = process(staged, IMAGE_ID, "vmdk", "ovf", Settings(Policy()))
    assert accepted.converted
    assert accepted.path == str(staging / f"{IMAGE_ID}.diskpipe.raw")
    reference = tmp_path / "reference.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", staged, str(reference)], check=True)
    assert Path(accepted.path).read_bytes() == reference.read_bytes()
    assert (accepted.disk_format, accepted.container_format) == ("raw", "bare")
    assert accepted.virtual_size == accepted.size == reference.stat().st_size
    assert accepted.properties["diskpipe_source_format"] == "vmdk"
    assert accepted.properties["diskpipe_checks"] == "passed"
    # The staged file is left to the caller; no temporary remains.
    assert sorted(entry.name for entry in staging.iterdir()) == sorted([IMAGE_ID, f"{IMAGE_ID}.diskpipe.raw"])


def test_a_leftover_of_a_crashed_attempt_is_replaced(stage_sample: StageSample, staging: Path) -> None:
    sample, staged = stage_sample("qcow2-v3-c64k")
    (staging / f"{IMAGE_ID}.diskpipe.raw").write_bytes(b"stale output")
    (staging / f".{IMAGE_ID}.diskpipe.tmp.deadhost-1").write_bytes(b"stale temporary")
    accepted = process(staged, IMAGE_ID, "qcow2", "bare", Settings(Policy()))
    assert accepted.size == sample.virtual_size == Path(accepted.path).stat().st_size
    assert sorted(entry.name for entry in staging.iterdir()) == sorted([IMAGE_ID, f"{IMAGE_ID}.diskpipe.raw"])


@pytest.mark.parametrize(
    ("name", "container_format"),
    [("aki-bzimage", "aki"), ("iso-eltorito", "bare"), ("raw-513b", "bare"), ("ami-ext4", "ami")],
)
def test_raw_data_is_handed_on_as_uploaded_with_its_claim(
    name: str, container_format: str, stage_sample: StageSample
) -> None:
    sample, staged = stage_sample(name)
    accepted = process(staged, IMAGE_ID, claim(sample), container_format, Settings(Policy()))
    assert not accepted.converted
    assert accepted.path == staged
    assert (accepted.disk_format, accepted.container_format) == (claim(sample), container_format)
    size = Path(staged).stat().st_size
    assert accepted.size == accepted.virtual_size == size  # Glance's rule for raw data: its byte count


def test_raw_data_is_converted_when_qcow2_is_the_output(stage_sample: StageSample) -> None:
    _, staged = stage_sample("raw-1m-random")
    accepted = process(staged, IMAGE_ID, "raw", "bare", Settings(Policy(), output_format="qcow2"))
    assert accepted.converted and accepted.disk_format == "qcow2"
    assert accepted.path.endswith(".diskpipe.qcow2")
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", staged, accepted.path], capture_output=True, check=False
    )
    assert compared.returncode == 0, compared.stdout


def test_an_encrypted_image_is_refused_for_want_of_its_key(stage_sample: StageSample, staging: Path) -> None:
    _, staged = stage_sample("qcow2-encrypt-luks")
    with pytest.raises(UnsafeImage, match="encrypted: "):
        process(staged, IMAGE_ID, "qcow2", "bare", Settings(Policy()))
    assert [entry.name for entry in staging.iterdir()] == [IMAGE_ID]


def test_a_missing_staged_file_or_a_bad_output_format_is_no_verdict_on_the_image(tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="cannot open the staged data"):
        process(str(tmp_path / IMAGE_ID), IMAGE_ID, "raw", "bare", Settings(Policy()))
    (tmp_path / IMAGE_ID).write_bytes(b"\0" * 512)
    with pytest.raises(ImportFailed, match="output_format 'vmdk'"):
        process(str(tmp_path / IMAGE_ID), IMAGE_ID, "raw", "bare", Settings(Policy(), output_format="vmdk"))


def test_a_long_refusal_is_shortened_but_still_names_every_check() -> None:
    issues = tuple(Issue(f"check_{index}", "x" * 2000) for index in range(30))
    message = refusal_message(issues)
    assert len(message) <= MESSAGE_LIMIT + 30 * 20
    for index in range(30):
        assert f"check_{index}: " in message
