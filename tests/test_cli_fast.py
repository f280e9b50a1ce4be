"""`diskpipe info`'s short path (diskpipe/cli/fast.py) reads a line as the
full argparse parser does, or not at all: the same namespace, the same
output and exit code, and for every line it does not know, the parser."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskpipe.cli import build_parser, fast, main
from diskpipe.cli.parser import command_in
from tests.test_startup import NOT_ON_THE_INFO_PATH

POLICY_TEXT = '[policy]\nallowed_formats = ["raw"]\n'

# Lines the short path reads: each must give the parser's namespace.
TAKEN = [
    ["info", "{qcow2}"],
    ["info", "{qcow2}", "{vhd}"],
    ["info", "--output=json", "{qcow2}"],
    ["info", "--output", "json", "{qcow2}", "{vhd}"],
    ["info", "{qcow2}", "--output", "human"],
    ["info", "--output=json", "{qcow2}", "--output=human"],  # the last one wins
    ["info", "--allocation", "--details", "{qcow2}"],
    ["info", "{qcow2}", "--allocation", "--allocation"],
    ["info", "-j", "1", "{qcow2}", "{vhd}"],
    ["info", "--jobs=2", "{qcow2}", "{vhd}", "{hostile}"],
    ["info", "--jobs", "007", "{qcow2}"],
    ["info", "--jobs", "0", "{qcow2}"],
    ["info", "--policy", "{policy}", "{qcow2}"],
    ["info", "--policy={policy}", "--output=json", "{qcow2}"],
    ["info", "--policy", "{missing}", "{qcow2}"],  # the policy file is missing
    ["info", "--policy", "{bad_policy}", "{qcow2}"],  # not TOML
    ["info", "{hostile}"],  # refused: exit 1
    ["info", "--output=json", "{hostile}", "{qcow2}"],
    ["info", "{missing}"],  # exit 2, the error on stderr
    ["info", "{qcow2}", "{missing}", "--output", "json"],
    ["info", ""],
    ["info", "{control}"],  # a name with an escape sequence in it
]
# Lines it leaves to the parser: usage errors, help, and what it does not know.
DECLINED = [
    [],
    ["info"],
    ["validate", "{qcow2}"],
    ["-v", "info", "{qcow2}"],
    ["info", "-v", "{qcow2}"],
    ["info", "{qcow2}", "--log-level", "error"],
    ["info", "--debug", "{missing}"],
    ["info", "-h"],
    ["info", "--help"],
    ["info", "--version"],
    ["info", "--out", "json", "{qcow2}"],  # an abbreviation
    ["info", "--output=xml", "{qcow2}"],
    ["info", "--output=", "{qcow2}"],
    ["info", "--output"],
    ["info", "{qcow2}", "--output"],
    ["info", "{qcow2}", "--details", "{vhd}"],  # a second run of files
    ["info", "{qcow2}", "--jobs", "2", "{vhd}"],
    ["info", "--jobs", "x", "{qcow2}"],
    ["info", "--jobs", "-1", "{qcow2}"],
    ["info", "--jobs", "\u0663", "{qcow2}"],  # an Arabic-Indic 3: int() reads it
    ["info", "-j2", "{qcow2}"],
    ["info", "-j=2", "{qcow2}"],
    ["info", "--allocation=yes", "{qcow2}"],
    ["info", "--policy", "{qcow2}"],  # no file left
    ["info", "--policy=", "{qcow2}"],
    ["info", "--policy", "-", "{qcow2}"],
    ["info", "--", "{qcow2}"],
    ["info", "-", "{qcow2}"],
    ["info", "-1"],
    ["info", "-x", "{qcow2}"],
    ["info", "--", "-x"],
]


@pytest.fixture(scope="module")
def names(samples_dir: Path, manifest: list[Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the placeholders in the lines stand for."""
    here = tmp_path_factory.mktemp("fast")
    (here / "policy.toml").write_text(POLICY_TEXT)
    (here / "bad.toml").write_text("[policy\n")

    def sample(name: str) -> str:
        return str(samples_dir / next(entry.file for entry in manifest if entry.name == name))

    return {
        "qcow2": sample("qcow2-v3-c64k"),
        "vhd": sample("vhd-dynamic"),
        "hostile": sample("hostile-qcow2-backing-passwd"),
        "policy": str(here / "policy.toml"),
        "bad_policy": str(here / "bad.toml"),
        "missing": str(here / "no such file"),
        "control": str(here / "a\x1b[2Jb"),
    }


def filled(line: list[str], names: dict[str, str]) -> list[str]:
    return [word.format_map(names) for word in line]


def parsed(words: list[str]) -> dict[str, Any] | int:
    """The full parser's namespace, or its exit code (usage error, help)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return vars(build_parser(command_in(words)).parse_args(words))
    except SystemExit as stop:
        return int(stop.code or 0)


def run(words: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`diskpipe WORDS` in this process: exit code, stdout, stderr."""
    try:
        code = main(words)
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("line", TAKEN, ids=" ".join)
def test_the_short_path_reads_a_line_as_the_parser_does(line: list[str], names: dict[str, str]) -> None:
    words = filled(line, names)
    found = fast.info_args(words)
    assert found is not None
    assert vars(found) == parsed(words)


@pytest.mark.parametrize("line", DECLINED, ids=" ".join)
def test_the_short_path_leaves_other_lines_to_the_parser(line: list[str], names: dict[str, str]) -> None:
    assert fast.info_args(filled(line, names)) is None


@pytest.mark.parametrize("line", TAKEN + DECLINED, ids=" ".join)
def test_the_command_says_the_same_with_and_without_the_short_path(
    line: list[str], names: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    words = filled(line, names)
    with_short_path = run(words, capsys)
    monkeypatch.setattr(fast, "info_args", lambda words: None)
    assert run(words, capsys) == with_short_path


@pytest.mark.parametrize("option", [["--jobs"], ["-j"]])
def test_a_jobs_number_longer_than_int_reads_is_the_parsers_usage_error(
    option: list[str], names: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """int() refuses more than sys.get_int_max_str_digits() digits (4300):
    argparse makes that its usage error (exit 2), the short path must not
    turn it into a traceback."""
    words = ["info", *option, "9" * (sys.get_int_max_str_digits() + 1), names["qcow2"]]
    assert fast.info_args(words) is None
    code, out, err = run(words, capsys)
    assert (code, out) == (2, "")
    assert "invalid int value" in err


WORDS = st.sampled_from(
    [
        "info", "validate", "a.qcow2", "b c.vhd", "", "-", "--", "-1", "-x", "json", "human", "xml", "3", "0",
        "\u0663", "p.toml", "--output", "--output=json", "--output=human", "--output=xml", "--out", "--output=",
        "--allocation", "--alloc", "--allocation=1", "--details", "--jobs", "--jobs=2", "--jobs=", "-j", "-j2",
        "-j=2", "--policy", "--policy=p.toml", "--policy=", "-v", "--debug", "--log-level", "-h", "--version",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(rest=st.lists(st.one_of(WORDS, st.text(max_size=4)), max_size=7), first=st.sampled_from(["info", "list", "-v"]))
def test_any_line_the_short_path_reads_the_parser_reads_alike(first: str, rest: list[str]) -> None:
    words = [first, *rest]
    found = fast.info_args(words)
    if found is not None:
        assert vars(found) == parsed(words)


def test_the_info_command_loads_none_of_the_costly_modules(names: dict[str, str]) -> None:
    """argparse (with re, enum, gettext, locale), typing, json, importlib:
    none is needed to read `info FILE`, inspect it and print the table."""
    code = (
        "import sys\n"
        "from diskpipe.cli import main\n"
        f"assert main(['info', {names['qcow2']!r}]) == 0\n"
        f"print(' '.join(sorted(set(sys.modules) & set({NOT_ON_THE_INFO_PATH!r}))))\n"
    )
    # No logging variable: the command logs nothing then, and loads no logging.
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == []


# The parser's path, as a process: the short path switched off.
WITHOUT_SHORT_PATH = (
    "import sys\n"
    "from diskpipe.cli import fast, main\n"
    "fast.info_args = lambda words: None\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize(
    "environment",
    [
        {"DISKPIPE_LOG_LEVEL": "bogus"},
        {"DISKPIPE_LOG_LEVEL": "info", "DISKPIPE_POLICY_MAX_VIRTUAL_SIZ": "1T"},
        {"DISKPIPE_POLICY_MAX_VIRTUAL_SIZ": "1T"},
        {"DISKPIPE_POLICY_MAX_VIRTUAL_SIZE": "1K"},
        {"DISKPIPE_CONFIG": "/nonexistent/diskpipe.toml"},
    ],
    ids=lambda environment: " ".join(f"{key}={value}" for key, value in environment.items()),
)
def test_the_environment_is_read_alike_on_both_paths(environment: dict[str, str], names: dict[str, str]) -> None:
    """Logging and policy variables, a missing configuration file: the
    process-wide set-up after the parsing is the same for both paths."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")} | environment
    words = ["info", names["qcow2"]]
    short = subprocess.run([sys.executable, "-m", "diskpipe", *words], env=env, capture_output=True, check=False)
    full = subprocess.run([sys.executable, "-c", WITHOUT_SHORT_PATH, *words], env=env, capture_output=True, check=False)
    assert (short.returncode, short.stdout, short.stderr) == (full.returncode, full.stdout, full.stderr)
    assert short.stdout or short.stderr  # something was said
