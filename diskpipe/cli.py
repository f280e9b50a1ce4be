"""The `diskpipe` command: parses arguments, calls the library, prints.

Heavy modules (numpy, Celery, Ceph bindings) are imported inside the command
that needs them, so `diskpipe info` starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_REFUSED = 1  # refused, unsafe or malformed image
EXIT_USAGE = 2  # usage, I/O or infrastructure error


def _terminal_width() -> int:
    """What argparse's formatter asks shutil for, without importing shutil
    (and the bz2/lzma modules it pulls in): every add_argument call builds a
    formatter, so this runs on every start."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, width or _terminal_width() - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _human_size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            text = f"{size:.0f}" if unit == "B" else f"{size:.1f}"
            return f"{text} {unit}"
        size /= 1024
    return str(value)


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def _info_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("file", str(entry.get("filename", "-")))]
    rows += [
        ("format", entry["format"]),
        ("disk format", entry["disk-format"]),
        ("virtual size", f"{_human_size(entry['virtual-size'])} ({entry['virtual-size']} bytes)"),
        ("file size", f"{_human_size(entry['file-size'])} ({entry['file-size']} bytes)"),
    ]
    if "actual-size" in entry:
        rows.append(("disk usage", _human_size(entry["actual-size"])))
    if "allocated-size" in entry:
        rows.append(("allocated", f"{_human_size(entry['allocated-size'])} ({entry['allocated-size']} bytes)"))
    if "cluster-size" in entry:
        rows.append(("cluster size", str(entry["cluster-size"])))
    if "subformat" in entry:
        rows.append(("subformat", entry["subformat"]))
    if "backing-filename" in entry:
        backing = entry["backing-filename"]
        if "backing-filename-format" in entry:
            backing += f" ({entry['backing-filename-format']})"
        rows.append(("backing file", backing))
    if "data-file" in entry:
        rows.append(("data file", entry["data-file"]))
    if entry.get("encrypted"):
        rows.append(("encrypted", "yes"))
    if entry.get("dirty-flag"):
        rows.append(("dirty", "yes"))
    rows.append(("matches", ", ".join(entry["matches"]) or "-"))
    rows.append(("contents", ", ".join(f"{c['kind']}:{c['name']}" for c in entry["contents"]) or "-"))
    if "safe" in entry:
        rows.append(("safe", "yes" if entry["safe"] else "NO"))
        for issue in entry.get("issues", []):
            rows.append(("issue", f"{issue['check']}: {issue['message']}"))
        for note in entry.get("notes", []):
            rows.append(("note", note))
    return rows


def _load_policy(args: argparse.Namespace) -> Any:
    from diskpipe.formats.policy import load_policy

    return load_policy(getattr(args, "policy", None))


def cmd_info(args: argparse.Namespace) -> int:
    from diskpipe.formats import FormatError, inspect
    from diskpipe.formats.policy import check

    policy = _load_policy(args)
    entries: list[dict[str, Any]] = []
    exit_code = EXIT_OK
    for path in args.files:
        try:
            info = inspect(path, allocation=args.allocation, details=args.details)
            entry = info.to_json()
            if not args.details:
                entry.pop("details", None)
            entry.update(check(info, policy).to_json())
            entries.append(entry)
        except FormatError as error:
            entries.append({"filename": path, "error": str(error), "safe": False})
            exit_code = max(exit_code, EXIT_REFUSED)
        except OSError as error:
            entries.append({"filename": path, "error": f"{error.strerror or error}", "safe": False})
            exit_code = max(exit_code, EXIT_USAGE)
    if args.output == "json":
        document: Any = entries[0] if len(entries) == 1 else entries
        import json

        print(json.dumps(document, indent=2))
    else:
        shown = 0
        for entry in entries:
            if "error" in entry:
                continue
            if shown:
                print()
            _print_table(_info_rows(entry))
            shown += 1
    # Errors go to stderr in both modes: stdout keeps only what was learnt.
    for entry in entries:
        if "error" in entry:
            print(f"diskpipe: {entry['filename']}: {entry['error']}", file=sys.stderr)
    return exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    from diskpipe.formats import FormatError
    from diskpipe.validation import UnsafeImage, ValidatingReader, validate

    policy = _load_policy(args)
    name = "<stdin>" if args.file == "-" else args.file
    result: dict[str, Any] = {"filename": name}
    try:
        if args.file == "-":
            reader = ValidatingReader(sys.stdin.buffer, claimed=args.claimed_format, policy=policy)
            try:
                while reader.read(1024 * 1024):
                    pass
                verdict = reader.verdict
            except UnsafeImage as unsafe:
                verdict = unsafe.verdict
            assert verdict is not None
        else:
            verdict = validate(args.file, claimed=args.claimed_format, policy=policy)
        if verdict.info is not None and verdict.info.virtual_size:
            result.update(
                format=verdict.info.format, disk_format=verdict.info.disk_format, virtual_size=verdict.info.virtual_size
            )
        result.update(verdict.to_json())
        exit_code = EXIT_OK if verdict.safe else EXIT_REFUSED
    except FormatError as error:
        result.update(safe=False, issues=[{"check": "malformed", "message": str(error)}], notes=[])
        exit_code = EXIT_REFUSED
    except OSError as error:
        print(f"diskpipe: {name}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    if args.output == "json":
        import json

        print(json.dumps(result, indent=2))
    elif exit_code == EXIT_OK:
        print(f"{name}: safe ({result.get('format', '?')}, disk_format {result.get('disk_format', '?')})")
        for note in result["notes"]:
            print(f"note: {note}")
    else:
        for issue in result["issues"]:
            print(f"{name}: {issue['check']}: {issue['message']}", file=sys.stderr)
        if result.get("decided") is False:
            for note in result["notes"]:
                print(f"{name}: undecided: {note}", file=sys.stderr)
    return exit_code


INSPECTION_COMMANDS = ("info", "validate")


class _VersionAction(argparse.Action):
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the command about to run and it is one
    of INSPECTION_COMMANDS, only those (the job commands' module is not
    imported on the fast path)."""
    parser = _Parser(prog="diskpipe", description="Inspect, validate, convert and store VM disk images.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="what an image really is, as qemu-img info would say")
    info.add_argument("files", nargs="+", metavar="FILE")
    info.add_argument("--output", choices=("human", "json"), default="human")
    info.add_argument("--allocation", action="store_true", help="read allocation tables: adds allocated-size")
    info.add_argument("--details", action="store_true", help="deeper facts (ISO volume via pycdlib, libmagic)")
    info.add_argument("--policy", metavar="FILE", help="configuration file with a [policy] section")
    info.set_defaults(handler=cmd_info)

    validate = commands.add_parser("validate", help="is an image safe to store? exit 0 safe, 1 unsafe or malformed")
    validate.add_argument("file", metavar="FILE|-", help="an image file, or - for standard input")
    validate.add_argument(
        "--claimed-format", metavar="FMT", help="the format the uploader claims (Glance or qemu name)"
    )
    validate.add_argument("--policy", metavar="FILE", help="configuration file with a [policy] section")
    validate.add_argument("--output", choices=("human", "json"), default="human")
    validate.set_defaults(handler=cmd_validate)

    if command not in INSPECTION_COMMANDS:
        from diskpipe.jobs_cli import add_commands

        add_commands(commands)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named by argv, if it is the first non-option word."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(words))
    args = parser.parse_args(words)
    try:
        from diskpipe.interrupts import run  # SIGTERM/SIGHUP/Ctrl-C: clean up, exit 128+N

        result: int = run(args.handler, args)
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
        print(f"diskpipe: {error}", file=sys.stderr)
        return EXIT_USAGE
