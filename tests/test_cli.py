"""The `diskpipe info` and `diskpipe validate` commands, run as a user runs
them: JSON keys, exit codes, several files, standard input."""

from __future__ import annotations

import json
import os
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


def loaded_after(argv: list[str], modules: str) -> str:
    """The sorted list of `modules` (a generator expression over sys.modules)
    as a fresh interpreter prints it after running `diskpipe ARGV`."""
    probe = f"import sys; from diskpipe.cli import main; main({argv!r}); print(sorted({modules}))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["info", "validate"])
def test_commands_do_not_import_heavy_modules(command: str, samples_dir: Path, manifest: list[Any]) -> None:
    path = samples_dir / by_name(manifest, "qcow2-v3-c64k").file
    loaded = loaded_after(
        [command, str(path)], "m for m in ('numpy', 'magic', 'pycdlib', 'celery', 'rados') if m in sys.modules"
    )
    expected = "['numpy']" if command == "validate" else "[]"  # validate reads allocation tables
    assert loaded == expected


def test_the_inspection_commands_do_not_load_the_job_commands_or_logging(
    samples_dir: Path, manifest: list[Any]
) -> None:
    path = samples_dir / by_name(manifest, "qcow2-v3-c64k").file
    loaded = loaded_after(
        ["info", str(path)],
        "m for m in sys.modules if m.startswith(('diskpipe.cli.', 'diskpipe.jobs', 'logging', 'json'))",
    )
    assert loaded == "['diskpipe.cli.exits', 'diskpipe.cli.fast', 'diskpipe.cli.inspection', " + (
        "'diskpipe.cli.logchoice', 'diskpipe.cli.options', 'diskpipe.cli.output']"
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_logging_options_are_taken_before_and_after_the_command(
    where: str, samples_dir: Path, manifest: list[Any]
) -> None:
    """A mistyped DISKPIPE_POLICY_* variable is warned about by the config
    loader: the warning follows --log-format and --log-level wherever they
    stand on the line."""
    path = str(samples_dir / by_name(manifest, "qcow2-v3-c64k").file)

    def run(*options: str) -> subprocess.CompletedProcess[str]:
        words = [*options, "info", path] if where == "before" else ["info", path, *options]
        env = dict(os.environ, DISKPIPE_POLICY_MAX_VIRTUAL_SIZ="1T")
        env.pop("DISKPIPE_LOG_LEVEL", None)
        env.pop("DISKPIPE_LOG_FORMAT", None)
        return subprocess.run(
            [sys.executable, "-m", "diskpipe", *words], env=env, capture_output=True, text=True, check=False
        )

    as_json = run("--log-format", "json")
    assert as_json.returncode == 0, as_json.stderr
    lines = as_json.stderr.strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "WARNING" and entry["logger"] == "diskpipe.config"
    assert "DISKPIPE_POLICY_MAX_VIRTUAL_SIZ" in entry["message"] and entry["time"].endswith("+00:00")
    quiet = run("--log-level", "error")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "format        qcow2" in quiet.stdout
    bad = run("--log-level", "chatty")
    assert bad.returncode == 2 and "--log-level" in bad.stderr


def test_verbosity_adds_up_across_the_command_name() -> None:
    from diskpipe.cli import build_parser
    from diskpipe.cli.logchoice import logging_choice

    def choice(*words: str) -> tuple[str, str, bool]:
        return logging_choice(build_parser().parse_args(list(words)))

    assert choice("list") == ("WARNING", "text", False)
    assert choice("-v", "list") == ("INFO", "text", True)
    assert choice("list", "-v") == ("INFO", "text", True)
    assert choice("-v", "list", "-v") == ("DEBUG", "text", True)
    assert choice("list", "--debug")[0] == "DEBUG"
    assert choice("--debug", "list", "--log-level", "warning") == ("WARNING", "text", True)
    assert choice("--log-format", "json", "list") == ("WARNING", "json", True)
    assert build_parser().parse_args(["list", "--debug"]).debug is True


def help_of(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "diskpipe", *command, "--help"],
        env=dict(os.environ, COLUMNS="200"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_option_has_help_and_names_what_it_overrides() -> None:
    import argparse

    from diskpipe.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)
        assert "exit codes:" in (command.epilog or "") and "examples:" in (command.epilog or ""), name
        assert "  2  usage, setup or infrastructure error" in (command.epilog or ""), name
    text = help_of("import")
    assert "(env CELERY_BROKER_URL / DISKPIPE_BROKER_URL, [celery] broker_url)" in " ".join(text.split())
    assert "[store] kind" in text and "DISKPIPE_STORE_KIND" in text and "without a broker" in text
    assert "DISKPIPE_POLICY_<KEY>" in text and "DISKPIPE_CONFIG" in text
    assert "env DISKPIPE_LOG_LEVEL" in text and "env DISKPIPE_LOG_FORMAT" in text
    assert "  1  the image or its source was refused" in text
    assert "diskpipe import disk.qcow2" in text
    assert "  1  " not in help_of("list")  # list judges no image


def test_shell_completion_scripts_come_from_the_parser(tmp_path: Path) -> None:
    bash = subprocess.run(
        [sys.executable, "-m", "diskpipe", "completion", "bash"], capture_output=True, text=True, check=True
    ).stdout
    script = tmp_path / "diskpipe.bash"
    script.write_text(bash)
    # Real bash completes a command name and an option of `import`.
    completed = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; "
            'COMP_WORDS=(diskpipe im); COMP_CWORD=1; COMP_LINE="diskpipe im"; COMP_POINT=${#COMP_LINE}; '
            '_shtab_diskpipe; echo "${COMPREPLY[@]}"; '
            'COMP_WORDS=(diskpipe import --claimed); COMP_CWORD=2; COMP_LINE="diskpipe import --claimed"; '
            'COMP_POINT=${#COMP_LINE}; _shtab_diskpipe; echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.split("\n")[:2] == ["import", "--claimed-format"]
    zsh = subprocess.run(
        [sys.executable, "-m", "diskpipe", "completion", "zsh"], capture_output=True, text=True, check=True
    ).stdout
    assert zsh.startswith("#compdef diskpipe") and "--log-format" in zsh
    assert diskpipe("completion", "fish").returncode == 2


def test_info_jobs_keeps_the_order_and_the_exit_code_of_one_process(samples_dir: Path, manifest: list[Any]) -> None:
    """`--jobs N` inspects on N processes; the JSON list and the exit code are
    those of `--jobs 1`, broken and missing files included, in the given order."""
    files = [str(samples_dir / entry.file) for entry in manifest][:60] * 2
    files[5] = "/nonexistent/disk.img"  # unreadable: exit 2 wins over a refused image
    alone = diskpipe("info", "--output=json", "--jobs", "1", *files)
    spread = diskpipe("info", "--output=json", "--jobs", "2", *files)
    assert spread.returncode == alone.returncode == 2, spread.stderr
    assert json.loads(spread.stdout) == json.loads(alone.stdout)
    assert [entry["filename"] for entry in json.loads(spread.stdout)] == files
