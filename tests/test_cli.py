"""The `diskpipe info` and `diskpipe validate` commands, run as a user runs
them: JSON keys, exit codes, several files, standard input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_info


def diskpipe(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "diskpipe", *args], input=stdin, capture_output=True, check=False)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def by_name(manifest: list[Any], name: str) -> Any:
    return next(entry for entry in manifest if entry.name == name)


def test_info_json_speaks_qemu_img_keys(samples_dir: Path, manifest: list[Any]) -> None:
    entry = by_name(manifest, "qcow2-v3-c64k")
    path = samples_dir / entry.file
    result = diskpipe("info", "--output=json", str(path))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    oracle = qemu_info(path, "qcow2")
    for key in ("filename", "format", "virtual-size", "cluster-size", "format-specific", "dirty-flag"):
        assert document[key] == oracle[key], key
    assert document["disk-format"] == "qcow2"
    assert document["matches"] == ["qcow2"] and document["contents"] == []
    assert document["safe"] is True and document["issues"] == []
    assert "allocated-size" not in document


def test_info_allocation_and_details(samples_dir: Path, manifest: list[Any]) -> None:
    data = by_name(manifest, "qcow2-data-offsets")
    iso = by_name(manifest, "iso-eltorito")
    result = diskpipe(
        "info", "--output=json", "--allocation", "--details", str(samples_dir / data.file), str(samples_dir / iso.file)
    )
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["allocated-size"] == data.allocated
    iso_content = second["contents"][0]
    assert iso_content["kind"] == "iso"
    assert iso_content["details"]["el-torito-entries"][0]["bootable"] is True


def test_info_several_files_with_errors_gives_the_highest_code(
    samples_dir: Path, manifest: list[Any], tmp_path: Path
) -> None:
    good = samples_dir / by_name(manifest, "vhd-dynamic").file
    broken = tmp_path / "broken.vhd"
    broken.write_bytes(b"conectix" + bytes(1000))
    missing = tmp_path / "missing.img"
    result = diskpipe("info", "--output=json", str(good), str(broken))
    assert result.returncode == 1
    entries = json.loads(result.stdout)
    assert entries[0]["format"] == "vpc" and "checksum" in entries[1]["error"]
    result = diskpipe("info", "--output=json", str(good), str(broken), str(missing))
    assert result.returncode == 2
    assert "No such file" in json.loads(result.stdout)[2]["error"]
    assert [entry.get("safe") for entry in json.loads(result.stdout)[1:]] == [False, False]
    single = diskpipe("info", "--output=json", str(missing))
    assert isinstance(json.loads(single.stdout), dict) and json.loads(single.stdout)["safe"] is False


def test_info_errors_go_to_stderr_in_human_mode(samples_dir: Path, manifest: list[Any], tmp_path: Path) -> None:
    good = samples_dir / by_name(manifest, "vhd-dynamic").file
    missing = tmp_path / "missing.img"
    result = diskpipe("info", str(good), str(missing))
    assert result.returncode == 2
    assert "missing.img" not in result.stdout and "format        vpc" in result.stdout
    assert result.stderr.strip() == f"diskpipe: {missing}: No such file or directory"


def test_version() -> None:
    result = diskpipe("--version")
    assert result.returncode == 0 and result.stdout.startswith("diskpipe ")


def test_info_human_table_and_unsafe_image(samples_dir: Path, manifest: list[Any]) -> None:
    entry = by_name(manifest, "hostile-qcow2-backing-passwd")
    result = diskpipe("info", str(samples_dir / entry.file))
    assert result.returncode == 0  # info reports, validate judges
    assert "backing file  /etc/passwd (raw)" in result.stdout
    assert "safe          NO" in result.stdout
    assert "backing_file:" in result.stdout


def test_info_usage_error() -> None:
    assert diskpipe("info").returncode == 2
    assert diskpipe("info", "--output=xml", "x").returncode == 2


def test_validate_exit_codes_fit_a_shell_pre_upload_step(
    samples_dir: Path, manifest: list[Any], tmp_path: Path
) -> None:
    honest = samples_dir / by_name(manifest, "vmdk-stream-data").file
    assert diskpipe("validate", str(honest)).returncode == 0
    assert diskpipe("validate", "--claimed-format", "vmdk", str(honest)).returncode == 0
    refused = diskpipe("validate", "--claimed-format", "raw", str(honest))
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith("(vmdk to qemu)")
    hostile = samples_dir / by_name(manifest, "hostile-vmdk-extent-host-path").file
    lines = diskpipe("validate", str(hostile)).stderr.strip().splitlines()
    assert sorted({line.split(": ")[1] for line in lines}) == ["vmdk_create_type", "vmdk_extents"]
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
    malformed = diskpipe("validate", "--output=json", str(broken))
    assert malformed.returncode == 1
    assert json.loads(malformed.stdout)["issues"][0]["check"] == "malformed"
    assert diskpipe("validate", str(tmp_path / "missing")).returncode == 2
    shell = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m diskpipe validate {hostile} && echo uploaded"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "uploaded" not in shell.stdout


def test_validate_reads_standard_input(samples_dir: Path, manifest: list[Any]) -> None:
    honest = (samples_dir / by_name(manifest, "qcow2-v3-c64k").file).read_bytes()
    assert diskpipe("validate", "--claimed-format", "qcow2", "-", stdin=honest).returncode == 0
    refused = diskpipe("validate", "--output=json", "--claimed-format", "raw", "-", stdin=honest)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["issues"][0]["check"] == "claimed_format"


def test_validate_with_a_policy_file(samples_dir: Path, manifest: list[Any], tmp_path: Path) -> None:
    bochs = samples_dir / by_name(manifest, "bochs-growing").file
    assert diskpipe("validate", str(bochs)).returncode == 1
    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\nallowed_formats = ["raw", "qcow2", "bochs"]\n')
    assert diskpipe("validate", "--policy", str(policy), str(bochs)).returncode == 0


@pytest.mark.parametrize("command", ["info", "validate"])
def test_commands_do_not_import_heavy_modules(command: str, samples_dir: Path, manifest: list[Any]) -> None:
    path = samples_dir / by_name(manifest, "qcow2-v3-c64k").file
    probe = (
        "import sys; from diskpipe.cli import main; "
        f"main([{command!r}, {str(path)!r}]); "
        "print(sorted(m for m in ('numpy', 'magic', 'pycdlib', 'celery', 'rados') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = result.stdout.strip().splitlines()[-1]
    expected = "['numpy']" if command == "validate" else "[]"  # validate reads allocation tables
    assert loaded == expected
