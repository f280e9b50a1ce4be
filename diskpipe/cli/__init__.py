"""The `diskpipe` command: parses arguments, calls the library, prints.

Modules, one job each: `parser` (formatting, usage errors, the logging
options), `exits` (exit codes and the epilog listing them), `logs` (the
run's logging), `output` (tables, sizes, records), `inspection` (info,
validate), `context` (broker, store, records), `convert`, `imports`,
`records` (status, list, cancel, delete, protect, cleanup), `completion`.

`diskpipe info` and `validate` start fast: the job commands' modules (and
Celery, Redis, Ceph, numpy behind them) are not even imported for them.
"""

from __future__ import annotations

import gc
import os
import sys

from diskpipe.cli import fast, inspection
from diskpipe.cli.exits import EXIT_OK, EXIT_USAGE
from diskpipe.cli.logchoice import logging_choice
from diskpipe.cli.output import printable

# argparse and the parser's module load only when the full parser runs:
# `diskpipe info FILE` usually never needs them (diskpipe/cli/fast.py).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = ["build_parser", "main"]

DESCRIPTION = "Inspect, validate, convert and store VM disk images."
EPILOG = """\
exit codes (every command):
  0  done, or the image is safe
  1  an image was refused: unsafe, malformed, or its source not allowed
  2  usage, setup or infrastructure error (bad option or config, missing file, broker or store down)

configuration: DISKPIPE_CONFIG (else /etc/diskpipe/diskpipe.toml), one [section] per part;
DISKPIPE_<SECTION>_<KEY> overrides one key; an option overrides both.
`diskpipe COMMAND --help` lists a command's options, exit codes and examples."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the command about to run and it is
    info or validate, only those (the job commands' modules stay unloaded)."""
    from diskpipe.cli.parser import Parser, VersionAction, add_logging_options

    after_command = Parser(add_help=False)
    add_logging_options(after_command, after_command=True)
    parser = Parser(prog="diskpipe", description=DESCRIPTION, epilog=EPILOG)
    add_logging_options(parser, after_command=False)
    parser.add_argument("--version", action=VersionAction, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    inspection.add_commands(commands, after_command)
    if command not in inspection.COMMANDS:
        from diskpipe.cli import completion, convert, imports, records

        convert.add_command(commands, after_command)
        imports.add_command(commands, after_command)
        records.add_commands(commands, after_command)
        completion.add_command(commands, after_command)
    return parser


def prepare_process(args: argparse.Namespace) -> None:
    """Ready the process for the command: the one place for process-wide
    set-up (logging here; signal handling belongs here too)."""
    level, log_format, asked = logging_choice(args)
    if asked or args.command not in inspection.COMMANDS:
        from diskpipe.cli import logs

        logs.configure(level, log_format)


def _run(args: argparse.Namespace) -> int:
    """The command; a writing one (convert, import) turns SIGTERM and SIGHUP
    into Ctrl-C's clean stop (diskpipe.interrupts), the others run as they are."""
    if args.command in ("convert", "import"):
        from diskpipe.interrupts import run

        return run(args.handler, args)
    result: int = args.handler(args)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    # Start-up only allocates what lives for the whole run (modules, classes,
    # tables): a collection pass over it finds nothing, yet costs about a
    # millisecond of a `diskpipe info` start. The collector is off until the
    # command's own modules are loaded (inspection.command_loaded for info
    # and validate, right away for the others), and as it was on return.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _main(argv)
    finally:
        (gc.enable if collecting else gc.disable)()


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = fast.info_args(words)
    if args is None:
        from diskpipe.cli.parser import command_in

        args = build_parser(command_in(words)).parse_args(words)
    if args.command not in inspection.COMMANDS:
        inspection.command_loaded()
    try:
        prepare_process(args)
        result: int = _run(args)
        return result
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`diskpipe info x | head`); say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:
        if args.debug:
            raise
        print(f"diskpipe: {printable(str(error))}", file=sys.stderr)
        return EXIT_USAGE
