"""`diskpipe completion bash|zsh|tcsh`: the shell completion script, made
by shtab from this very parser (scripts/setup.sh writes it into the
virtualenv when it installs diskpipe, so it always matches the options)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diskpipe.cli.exits import EXIT_OK, EXIT_USAGE, epilog

SHELLS = ("bash", "zsh", "tcsh")
# Positional arguments and options that name local files (shtab completes them as paths).
FILE_METAVARS = frozenset({"FILE", "FILE|-", "SRC", "FILE|URL"})


def _mark_file_arguments(parser: argparse.ArgumentParser) -> None:
    import shtab

    for action in parser._actions:  # argparse keeps no public list of them
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _mark_file_arguments(subparser)
        elif action.metavar in FILE_METAVARS:
            action.complete = shtab.FILE  # type: ignore[attr-defined]


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        print("diskpipe: shell completion needs shtab: pip install 'diskpipe[completion]'", file=sys.stderr)
        return EXIT_USAGE
    from diskpipe.cli import build_parser

    parser = build_parser()
    _mark_file_arguments(parser)
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


def add_command(commands: Any, parent: argparse.ArgumentParser) -> None:
    completion = commands.add_parser(
        "completion",
        parents=[parent],
        help="print the shell completion script (bash, zsh or tcsh)",
        description="Print a completion script for the shell. scripts/setup.sh installs the bash one as "
        ".venv/share/bash-completion/completions/diskpipe and the zsh one as .venv/share/zsh/site-functions/_diskpipe.",
        epilog=epilog(
            "printed",
            None,
            [
                "source <(diskpipe completion bash)",
                "diskpipe completion zsh > ~/.zfunc/_diskpipe   # a directory on $fpath",
            ],
        ),
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    completion.set_defaults(handler=cmd_completion)
