"""The `diskpipe` command: parses arguments, calls the library, prints.

Heavy modules (numpy, Celery, Ceph bindings) are imported inside the command
that needs them, so `diskpipe info` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_REFUSED = 1  # refused, unsafe or malformed image
EXIT_USAGE = 2  # usage, I/O or infrastructure error


class _Parser(argparse.ArgumentParser):
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
    if "error" in entry:
        return [*rows, ("error", entry["error"])]
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


def cmd_info(args: argparse.Namespace) -> int:
    from diskpipe.formats import FormatError, inspect

    entries: list[dict[str, Any]] = []
    exit_code = EXIT_OK
    for path in args.files:
        try:
            info = inspect(path, allocation=args.allocation, details=args.details)
            entry = info.to_json()
            if not args.details:
                entry.pop("details", None)
            entries.append(entry)
        except FormatError as error:
            entries.append({"filename": path, "error": str(error)})
            exit_code = max(exit_code, EXIT_REFUSED)
        except OSError as error:
            entries.append({"filename": path, "error": f"{error.strerror or error}"})
            exit_code = max(exit_code, EXIT_USAGE)
    if args.output == "json":
        document: Any = entries[0] if len(entries) == 1 else entries
        print(json.dumps(document, indent=2))
    else:
        for index, entry in enumerate(entries):
            if index:
                print()
            _print_table(_info_rows(entry))
    for entry in entries:
        if "error" in entry and args.output == "json":
            print(f"diskpipe: {entry['filename']}: {entry['error']}", file=sys.stderr)
    return exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diskpipe", description="Inspect, validate, convert and store VM disk images.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="what an image really is, as qemu-img info would say")
    info.add_argument("files", nargs="+", metavar="FILE")
    info.add_argument("--output", choices=("human", "json"), default="human")
    info.add_argument("--allocation", action="store_true", help="read allocation tables: adds allocated-size")
    info.add_argument("--details", action="store_true", help="deeper facts (ISO volume via pycdlib, libmagic)")
    info.set_defaults(handler=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
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
