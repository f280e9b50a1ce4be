"""`diskpipe info FILE...` read without argparse, for the lines people type.

Why it exists: the full parser costs a `diskpipe info` start about 18 ms
of CPU (importing argparse with re, enum, gettext, locale and typing behind
it, building the parser, parsing), measured on the 2-core test machine
where a bare `python -c pass` takes about 15 ms: the call is 3.0x a bare
start with the parser and 1.8-1.9x without it; the goal is 2x
(`python -m benchmarks.inspect_speed --startup`, issue 13).

It knows exactly one shape: `info` as the first word, then FILE operands in
one run and info's own options spelled out in full (--output human|json,
--allocation, --details, --jobs/-j N, --policy FILE, a value as the next
word or after `=` for the long ones). For anything else (another command,
-h, --version, a logging option, an abbreviation, `--`, a word or value
that starts with `-`, files split by an option, no file) it answers None
and the full parser reads the line, so help, usage errors and exit codes
come from argparse alone. tests/test_cli_fast.py checks that both give the
same namespace and the same output.
"""

from __future__ import annotations

from diskpipe.cli.inspection import cmd_info
from diskpipe.cli.options import OUTPUTS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    from argparse import Namespace
    from collections.abc import Sequence
else:  # what parse_args returns, as far as the commands use it: attributes
    from types import SimpleNamespace as Namespace

_FLAGS = {"--allocation": "allocation", "--details": "details"}
_WITH_VALUE = {"--output": "output", "--jobs": "jobs", "-j": "jobs", "--policy": "policy"}


class _Unsure(Exception):
    """The line is not of the one shape this reader knows with certainty."""


def info_args(words: Sequence[str]) -> Namespace | None:
    """What `build_parser().parse_args(words)` returns for an `info` line
    of the shape above; None for any other line."""
    if not words or words[0] != "info":
        return None
    try:
        files, chosen = _read(words[1:])
    except _Unsure:
        return None
    return Namespace(
        debug=False, verbose=0, log_level=None, log_format=None, version=None, command="info", files=files,
        **chosen, handler=cmd_info,
    )  # fmt: skip


def _read(words: Sequence[str]) -> tuple[list[str], dict[str, object]]:
    """The FILE operands and the options' values after `info`."""
    chosen: dict[str, object] = {"output": "human", "allocation": False, "details": False, "jobs": None, "policy": None}
    files: list[str] = []
    files_ended = False
    position = 0
    while position < len(words):
        word = words[position]
        position += 1
        if not word.startswith("-"):
            _require(not files_ended)  # argparse takes FILE... once: a second run is its error
            files.append(word)
            continue
        files_ended = bool(files)
        if word in _FLAGS:
            chosen[_FLAGS[word]] = True
            continue
        name, equals, value = word.partition("=")
        _require(name in _WITH_VALUE and not (equals and name == "-j"))
        if not equals:
            _require(position < len(words))
            value = words[position]
            position += 1
        chosen[_WITH_VALUE[name]] = _value(_WITH_VALUE[name], value)
    _require(bool(files))
    return files, chosen


def _value(dest: str, value: str) -> str | int:
    """An option's value as argparse would store it; _Unsure when it might
    do something else (an error, or read it differently)."""
    _require(bool(value) and not value.startswith("-"))
    if dest == "output":
        _require(value in OUTPUTS)
    elif dest == "jobs":
        _require(value.isascii() and value.isdigit())
        try:
            return int(value)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits): argparse's usage error
            raise _Unsure from None
    return value


def _require(certain: bool) -> None:
    if not certain:
        raise _Unsure
