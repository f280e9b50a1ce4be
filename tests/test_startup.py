"""What `diskpipe info` loads: the inspection path (formats, policy,
config, batch) imports neither typing nor re, enum, functools or the
heavy optional libraries, and its records behave as typing.NamedTuples."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from diskpipe.formats.tuples import NamedTuple as LightNamedTuple

ROOT = Path(__file__).resolve().parent.parent
# Each costs milliseconds at start-up; none is needed to inspect and judge a file.
NOT_ON_THE_INFO_PATH = (
    "typing", "re", "enum", "functools", "dataclasses", "inspect", "argparse", "gettext", "locale", "logging",
    "json", "importlib", "warnings", "collections.abc",
    "numpy", "magic", "pycdlib", "zstandard", "google_crc32c", "tqdm", "celery", "redis", "rados", "rbd",
)  # fmt: skip


def test_inspecting_and_judging_loads_none_of_the_costly_modules(samples_dir: Path, manifest: list[Any]) -> None:
    paths = [str(samples_dir / entry.file) for entry in manifest if entry.name in ("qcow2-v3-c64k", "vhd-dynamic")]
    code = (
        "import sys\n"
        "from diskpipe.formats.batch import inspect_many\n"
        f"results = inspect_many({paths!r}, jobs=1)\n"
        "assert [result.problem for result in results] == [None, None], results\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    # A clean environment: no configuration file or policy variables to convert.
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "diskpipe.formats.qcow2" in loaded  # the inspection did run here
    assert sorted(loaded.intersection(NOT_ON_THE_INFO_PATH)) == []
    # Container modules load when their signature is found; the sniffers for
    # data no container claims load only for such data.
    unused = {
        f"diskpipe.formats.{name}" for name in ("vmdk", "vhdx", "parallels", "bochs", "cloop", "ramdisk", "nondisk")
    }
    assert sorted(loaded & unused) == []


def test_a_policy_from_the_environment_still_converts(tmp_path: Path) -> None:
    code = "from diskpipe.formats.policy import load_policy; print(load_policy().max_virtual_size)"
    env = dict(os.environ, DISKPIPE_POLICY_MAX_VIRTUAL_SIZE="3G")
    env.pop("DISKPIPE_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == 3 << 30


class Plain(NamedTuple):
    """A record: typing's own, the reference for Light's fields, defaults,
    equality, hash, repr and dict (its methods are Light's to prove)."""

    name: str
    size: int = 0
    tags: tuple[str, ...] = ()


class Light(LightNamedTuple):
    """A record."""

    name: str
    size: int = 0
    tags: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.name}:{self.size}"

    @property
    def empty(self) -> bool:
        return self.size == 0


def test_light_records_behave_as_typing_namedtuples() -> None:
    plain, light = Plain("a", 3), Light("a", 3)
    assert Light._fields == Plain._fields and Light._field_defaults == Plain._field_defaults
    assert light == plain and hash(light) == hash(plain) and tuple(light) == ("a", 3, ())
    assert repr(light) == repr(plain).replace("Plain", "Light")
    assert light.label() == "a:3" and not light.empty and Light("b").empty
    assert light._replace(size=0) == ("a", 0, ()) and light._asdict() == plain._asdict()
    assert Light._make(["c", 1, ("x",)]).tags == ("x",)
    assert Light.__doc__ == "A record." and list(Light.__annotations__) == ["name", "size", "tags"]
    assert Light.__module__ == __name__ and Light.__qualname__ == "Light"
    assert pickle.loads(pickle.dumps(light)) == light
    assert isinstance(light, tuple)
    with pytest.raises(TypeError):
        Light()  # type: ignore[call-arg]


def test_light_records_refuse_what_typing_refuses() -> None:
    with pytest.raises(TypeError, match="non-default field"):

        class Backwards(LightNamedTuple):
            first: int = 0
            second: int

    with pytest.raises(AttributeError, match="_replace"):

        class Clobbers(LightNamedTuple):
            value: int

            def _replace(self) -> None:  # type: ignore[override]
                pass


@pytest.mark.parametrize("command", ["info", "validate"])
def test_the_collector_is_off_while_starting_and_on_while_inspecting(
    command: str, samples_dir: Path, manifest: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Start-up runs with the garbage collector off (it would find nothing);
    the files are inspected with it on (a long run over many hostile files
    must stay bounded), and the caller gets it back as it was."""
    import gc

    from diskpipe import cli
    from diskpipe.formats import batch, policy

    seen: dict[str, bool] = {}
    real_load_policy = policy.load_policy

    def load_policy_noting(*args: Any, **kwargs: Any) -> Any:
        seen["working"] = gc.isenabled()
        return real_load_policy(*args, **kwargs)

    real_parse = cli.fast.info_args

    def info_args_noting(words: Any) -> Any:
        seen["starting"] = gc.isenabled()
        return real_parse(words)

    monkeypatch.setattr(policy, "load_policy", load_policy_noting)
    monkeypatch.setattr(cli.fast, "info_args", info_args_noting)
    sample = next(sample for sample in manifest if sample.group == "honest" and sample.format == "qcow2")
    assert gc.isenabled()
    assert cli.main([command, str(samples_dir / sample.file)]) == 0
    assert seen == {"starting": False, "working": True}
    assert gc.isenabled()
    assert batch.inspect_many  # the info path's module was loaded
    gc.disable()
    try:
        cli.main([command, str(samples_dir / sample.file)])
        assert not gc.isenabled(), "a caller that had the collector off got it back on"
    finally:
        gc.enable()
    capsys.readouterr()


def test_a_usage_error_gives_the_collector_back(capsys: Any) -> None:
    import gc

    from diskpipe import cli

    with pytest.raises(SystemExit):
        cli.main(["info", "--no-such-option"])
    assert gc.isenabled()
    capsys.readouterr()
