"""The argument parser's parts: formatting, errors (exit 2), `--version`,
and the logging options every command takes before or after its name."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from diskpipe.cli.exits import EXIT_USAGE
from diskpipe.cli.logchoice import FORMAT_VARIABLE, LEVEL_VARIABLE, LOG_FORMATS, LOG_LEVELS

# Global options that take a value: the word after them is not the command.
OPTIONS_WITH_VALUE = frozenset({"--log-level", "--log-format"})


def _terminal_width() -> int:
    """What argparse's formatter asks shutil for, without importing shutil
    (and the bz2/lzma modules it pulls in): every add_argument call builds a
    formatter, so this runs on every start."""
    try:
        columns = int(os.environ["COLUMNS"])
        if columns > 0:
            return columns
    except (KeyError, ValueError):
        pass
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (AttributeError, ValueError, OSError):
        return 80
    return columns if columns > 0 else 80  # a 0-column pty (`stty cols 0`)


class Formatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps a paragraph with a
    heading or indented lines (exit codes, examples) as written."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 30, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, width or max(40, _terminal_width() - 2))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") or line.endswith(":") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


class Parser(argparse.ArgumentParser):
    """A usage error is exit 2 with the usage line and one error line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class VersionAction(argparse.Action):
    """`--version`, looked up only when asked: importlib.metadata would
    cost every `diskpipe info` start a few milliseconds."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("diskpipe")
        except PackageNotFoundError:  # a checkout that was never installed
            found = "unknown"
        print(f"diskpipe {found}")
        parser.exit()


def add_logging_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """`--debug`, `-v`, `--log-level`, `--log-format`, on the main parser and
    (`after_command`) again on each sub-command, so `diskpipe -v list` and
    `diskpipe list -v` mean the same. After the command a value is set only
    when given (SUPPRESS), so it never resets one given before; -v counts
    into its own name and the two counts are added (logchoice.logging_choice)."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    group = parser.add_argument_group("logging")
    group.add_argument("--debug", action="store_true", help="show tracebacks, and log at DEBUG", **unset)
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest="verbose_after" if after_command else "verbose",
        help="more log lines: -v INFO, -vv DEBUG (default WARNING)",
        **({"default": argparse.SUPPRESS} if after_command else {"default": 0}),
    )
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)}; wins over -v and --debug (env {LEVEL_VARIABLE})",
        **unset,
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help=f"json: one JSON object per log line, for log shippers (env {FORMAT_VARIABLE}; default text)",
        **unset,
    )


def command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named by argv: its first word that is neither an
    option nor the value of a global option."""
    words = iter(argv)
    for word in words:
        if word in OPTIONS_WITH_VALUE:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None
