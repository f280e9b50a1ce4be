"""The configuration a reader copies is the configuration the code reads:
docs/examples/worker.toml loads with diskpipe's own loader, the README's
sample shows every key of every section with its real default, and the
systemd unit passes `systemd-analyze verify`."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from diskpipe.config import load_file, load_section
from tests.conftest import ROOT

EXAMPLES = ROOT / "docs" / "examples"
# Every section of diskpipe.toml and the class that reads it (module, name).
SECTIONS = {
    "policy": ("diskpipe.formats.policy", "Policy"),
    "store": ("diskpipe.converter.stores.registry", "StoreConfig"),
    "celery": ("diskpipe.tasks.settings", "CeleryConfig"),
    "import": ("diskpipe.jobs.sources", "ImportConfig"),
    "rbd": ("diskpipe.converter.stores.rbd", "RbdConfig"),
    "s3": ("diskpipe.converter.stores.s3", "S3Config"),
}
# A commented key in the README sample: its default is no TOML value (none,
# or one that depends on the environment); the comment says what it is.
COMMENTED_KEY = re.compile(r"^#\s*([a-z_]+)\s*=")


def section_class(name: str) -> Any:
    module, attribute = SECTIONS[name]
    return getattr(importlib.import_module(module), attribute)


def field_names(cls: Any) -> list[str]:
    if hasattr(cls, "_fields"):
        return list(cls._fields)
    return list(cls.__dataclass_fields__)


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the file speaks: no DISKPIPE_* override from the test's environment."""
    for name in list(os.environ):
        if name.startswith("DISKPIPE_"):
            monkeypatch.delenv(name)


def test_the_worker_example_loads_with_the_config_loader() -> None:
    path = EXAMPLES / "worker.toml"
    document = load_file(str(path))
    assert set(document) <= set(SECTIONS), f"sections diskpipe does not read: {set(document) - set(SECTIONS)}"
    loaded = {name: load_section(section_class(name), name, document[name]) for name in document}
    # What makes it a worker that stores into RBD through a shared broker.
    assert loaded["store"].kind == "rbd"
    assert loaded["celery"].broker_url.startswith("redis://")
    assert loaded["rbd"].user == "diskpipe"
    assert loaded["rbd"].keyring
    assert loaded["import"].allowed_dirs
    assert loaded["celery"].concurrency == 2
    # Every other value is the real default, as the file's header says.
    chosen = {
        (name, key)
        for name, section in loaded.items()
        for key in document[name]
        if getattr(section, key) != getattr(section_class(name)(), key)
    }
    assert chosen == WORKER_CHOICES


# The keys docs/examples/worker.toml sets away from their defaults, each
# with a comment there that gives the default.
WORKER_CHOICES = {
    ("celery", "broker_url"),
    ("celery", "concurrency"),
    ("store", "kind"),
    ("rbd", "pool"),
    ("rbd", "user"),
    ("rbd", "conf"),
    ("rbd", "keyring"),
    ("import", "allowed_dirs"),
    ("import", "staging_dir"),
}


def readme_config_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def commented_keys(block: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    current = ""
    for line in block.splitlines():
        header = re.match(r"^\[([a-z0-9]+)\]", line)
        if header:
            current = header.group(1)
        elif match := COMMENTED_KEY.match(line):
            found.setdefault(current, set()).add(match.group(1))
    return found


def test_the_readme_config_sample_shows_every_key_with_its_real_default() -> None:
    block = readme_config_block()
    document = tomllib.loads(block)
    commented = commented_keys(block)
    assert set(document) == set(SECTIONS)
    for name, values in document.items():
        cls = section_class(name)
        written = set(values) | commented.get(name, set())
        missing = [key for key in field_names(cls) if key not in written]
        assert not missing, f"[{name}] in the README lacks {missing}"
        assert not commented.get(name, set()) & set(values), f"[{name}] has a key both set and commented"
        loaded, default = load_section(cls, name, values), cls()
        wrong = {
            key: (getattr(loaded, key), getattr(default, key))
            for key in values
            if getattr(loaded, key) != getattr(default, key)
        }
        assert not wrong, f"[{name}] in the README shows values that are not the defaults (shown, real): {wrong}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_worker_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = (EXAMPLES / "diskpipe-worker.service").read_text()
    assert "/opt/diskpipe/.venv/bin/celery -A diskpipe.tasks worker " in unit
    # verify checks that ExecStart's program exists: this checkout's.
    local = tmp_path / "diskpipe-worker.service"
    local.write_text(unit.replace("/opt/diskpipe", str(ROOT)))
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(local)], capture_output=True, text=True, check=False
    )
    # Unknown keys and bad values are only warnings: none may be printed.
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr
