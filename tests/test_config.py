"""The one configuration loader refuses what does not fit, and says where.

Every refusal names the key, where its value came from (the file and its
`[section] key`, or the environment variable) and an example of a valid
value; sizes, counts and durations are never negative or infinite; a key a
section lacks is refused with the key it most likely meant; a
`DISKPIPE_<SECTION>_<KEY>` variable naming no key is warned about once. The
command line exits 2 with that one line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diskpipe import config
from diskpipe.config import ConfigError, load, parse_size
from diskpipe.converter.stores.rbd import RbdConfig
from diskpipe.formats.policy import Policy
from diskpipe.jobs.sources import ImportConfig
from tests.conftest import ROOT

INT_EXAMPLE = "expected a whole number, not negative: 30, 4096 (sizes also 512M, 2T)"

# (what the file says, the section read, the key, the value as the message
# quotes it, the example it gives)
REFUSED_IN_FILE = [
    ("[policy]\nmax_virtual_size = -1\n", Policy, "[policy] max_virtual_size", "-1", INT_EXAMPLE),
    ('[policy]\nmax_virtual_size = "inf"\n', Policy, "[policy] max_virtual_size", "'inf'", INT_EXAMPLE),
    ("[policy]\nmax_virtual_size = 1e400\n", Policy, "[policy] max_virtual_size", "inf", INT_EXAMPLE),
    ("[policy]\nmax_virtual_size = nan\n", Policy, "[policy] max_virtual_size", "nan", INT_EXAMPLE),
    ('[policy]\nmax_virtual_size = "-1G"\n', Policy, "[policy] max_virtual_size", "'-1G'", INT_EXAMPLE),
    ('[policy]\nmax_virtual_size = "lots"\n', Policy, "[policy] max_virtual_size", "'lots'", INT_EXAMPLE),
    ("[policy]\nmax_virtual_size = 1.5\n", Policy, "[policy] max_virtual_size", "1.5", INT_EXAMPLE),
    ("[policy]\nmax_virtual_size = true\n", Policy, "[policy] max_virtual_size", "True", INT_EXAMPLE),
    ("[policy]\nallow_luks = [true]\n", Policy, "[policy] allow_luks", "[True]", "expected true or false"),
    ('[policy]\nallow_luks = "maybe"\n', Policy, "[policy] allow_luks", "'maybe'", "expected true or false"),
    ("[policy]\nallowed_formats = [1]\n", Policy, "[policy] allowed_formats", "1", "expected a string in quotes"),
    ("[rbd]\nuser = 5\n", RbdConfig, "[rbd] user", "5", 'expected a string in quotes: "text"'),
    ("[rbd]\nconnect_timeout = -5\n", RbdConfig, "[rbd] connect_timeout", "-5", INT_EXAMPLE),
    ("[import]\nunpack_timeout = inf\n", ImportConfig, "[import] unpack_timeout", "inf", "expected a number"),
    ("[import]\nread_timeout = -0.5\n", ImportConfig, "[import] read_timeout", "-0.5", "expected a number"),
]


@pytest.mark.parametrize(
    ("text", "section", "key", "quoted", "example"),
    REFUSED_IN_FILE,
    ids=[f"{row[2]}={row[3]}" for row in REFUSED_IN_FILE],
)
def test_a_bad_value_in_the_file_names_file_key_and_an_example(
    tmp_path: Path, text: str, section: Any, key: str, quoted: str, example: str
) -> None:
    path = tmp_path / "diskpipe.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load(section, str(path))
    message = str(refused.value)
    assert message.startswith(f"{path}: {key}: cannot use {quoted}; "), message
    assert example in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["-1", "inf", "1e400", "-1G", "nan", "lots", "2T!"])
def test_a_bad_size_in_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DISKPIPE_POLICY_MAX_VIRTUAL_SIZE", value)
    with pytest.raises(ConfigError) as refused:
        load(Policy, None)
    assert str(refused.value) == (
        f"environment variable DISKPIPE_POLICY_MAX_VIRTUAL_SIZE: cannot use {value!r}; {INT_EXAMPLE}"
    )


def test_good_values_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "diskpipe.toml"
    path.write_text('[policy]\nmax_virtual_size = "2T"\nallow_luks = false\n[rbd]\nconnect_timeout = 0\n')
    monkeypatch.setenv("DISKPIPE_POLICY_ALLOWED_FORMATS", "qcow2, raw")
    policy = load(Policy, str(path))
    assert (policy.max_virtual_size, policy.allow_luks) == (2 << 40, False)
    assert policy.allowed_formats == frozenset({"qcow2", "raw"})
    assert load(RbdConfig, str(path)).connect_timeout == 0
    monkeypatch.setenv("DISKPIPE_POLICY_MAX_VIRTUAL_SIZE", "1.5G")
    assert load(Policy, str(path)).max_virtual_size == 3 << 29


def test_parse_size_refuses_negative_and_infinite_sizes() -> None:
    for value in (-1, "-1", "inf", "1e400", "nan", ""):
        with pytest.raises(ConfigError):
            parse_size(value)
    assert parse_size("64KiB") == 64 << 10


def test_an_unknown_key_names_the_key_it_most_likely_meant(tmp_path: Path) -> None:
    path = tmp_path / "diskpipe.toml"
    path.write_text("[policy]\nmax_virtual_siz = 5\n")
    with pytest.raises(ConfigError) as refused:
        load(Policy, str(path))
    assert str(refused.value).startswith(
        f"{path}: [policy] has unknown key 'max_virtual_siz' (did you mean 'max_virtual_size'?); known: "
    )


def test_a_section_that_is_not_a_table_says_what_it_should_be(tmp_path: Path) -> None:
    path = tmp_path / "diskpipe.toml"
    path.write_text("policy = 5\n")
    with pytest.raises(ConfigError, match=r"\[policy\] must be a table: a line \[policy\], then key = value lines"):
        load(Policy, str(path))


def test_an_unknown_variable_is_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(config, "_warned", set())  # as a fresh process
    monkeypatch.setenv("DISKPIPE_POLICY_MAX_VIRTUAL_SIZ", "1G")
    with caplog.at_level(logging.WARNING, logger="diskpipe.config"):
        for _ in range(3):
            assert load(Policy, None).max_virtual_size == Policy().max_virtual_size  # ignored
    warnings = [
        record.getMessage() for record in caplog.records if "DISKPIPE_POLICY_MAX_VIRTUAL_SIZ" in record.getMessage()
    ]
    assert len(warnings) == 1
    assert "is not a setting of [policy]" in warnings[0] and "max_virtual_size" in warnings[0]


# -- the command line -------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    return path


def run_diskpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diskpipe", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def clean_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    env.update(settings)
    return env


def test_the_command_line_exits_2_with_the_one_line(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "diskpipe.toml"
    path.write_text("[policy]\nmax_virtual_size = -1\n")
    done = run_diskpipe(clean_env(DISKPIPE_CONFIG=str(path)), "info", str(image))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"diskpipe: {path}: [policy] max_virtual_size: cannot use -1; {INT_EXAMPLE}"]
    from_env = run_diskpipe(clean_env(DISKPIPE_POLICY_MAX_VIRTUAL_SIZE="inf"), "validate", str(image))
    assert from_env.returncode == 2
    assert from_env.stderr.splitlines() == [
        f"diskpipe: environment variable DISKPIPE_POLICY_MAX_VIRTUAL_SIZE: cannot use 'inf'; {INT_EXAMPLE}"
    ]


def test_the_command_line_warns_once_about_an_unknown_variable_and_goes_on(tmp_path: Path, image: Path) -> None:
    env = clean_env(
        DISKPIPE_POLICY_MAX_VIRTUAL_SIZ="1G",
        DISKPIPE_STORE_RECORDS=str(tmp_path / "records.sqlite"),
        DISKPIPE_IMPORT_STAGING_DIR=str(tmp_path / "staging"),
    )
    info = run_diskpipe(env, "info", str(image))
    assert info.returncode == 0, info.stderr
    (warning,) = info.stderr.splitlines()
    assert "DISKPIPE_POLICY_MAX_VIRTUAL_SIZ is not a setting of [policy]" in warning
    # An import reads [policy] and more sections: still one warning.
    imported = run_diskpipe(env, "import", str(image), "--store", f"file:{tmp_path / 'store'}", "--quiet")
    assert imported.returncode == 0, imported.stderr
    assert sum("DISKPIPE_POLICY_MAX_VIRTUAL_SIZ " in line for line in imported.stderr.splitlines()) == 1
