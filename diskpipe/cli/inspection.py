"""`diskpipe info` and `diskpipe validate`: the fast commands.

Nothing of the job machinery is imported here (see build_parser): these
commands start in tens of milliseconds, and load the format inspectors,
numpy or libmagic only when an image needs them.
"""

from __future__ import annotations

import gc
import sys

from diskpipe.cli import options
from diskpipe.cli.exits import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, epilog
from diskpipe.cli.output import print_json, print_table, printable, size_with_bytes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    import argparse
    from typing import Any

COMMANDS = ("info", "validate")


def _info_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("file", printable(str(entry.get("filename", "-")))),
        ("format", entry["format"]),
        ("disk format", entry["disk-format"]),
        ("virtual size", size_with_bytes(entry["virtual-size"])),
        ("file size", size_with_bytes(entry["file-size"])),
    ]
    rows += _optional_rows(entry)
    rows.append(("matches", ", ".join(entry["matches"]) or "-"))
    rows.append(("contents", printable(", ".join(f"{c['kind']}:{c['name']}" for c in entry["contents"])) or "-"))
    if "safe" in entry:
        rows.append(("safe", "yes" if entry["safe"] else "NO"))
        rows += [("issue", f"{issue['check']}: {printable(issue['message'])}") for issue in entry.get("issues", [])]
        rows += [("note", printable(note)) for note in entry.get("notes", [])]
    return rows


def _optional_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of facts only some images have."""
    rows = []
    if "actual-size" in entry:
        rows.append(("disk usage", size_with_bytes(entry["actual-size"])))
    if "allocated-size" in entry:
        rows.append(("allocated", size_with_bytes(entry["allocated-size"])))
    if "cluster-size" in entry:
        rows.append(("cluster size", str(entry["cluster-size"])))
    if "subformat" in entry:
        rows.append(("subformat", printable(entry["subformat"])))
    if "backing-filename" in entry:
        backing = entry["backing-filename"]
        if "backing-filename-format" in entry:
            backing += f" ({entry['backing-filename-format']})"
        rows.append(("backing file", printable(backing)))
    if "data-file" in entry:
        rows.append(("data file", printable(entry["data-file"])))
    if entry.get("encrypted"):
        rows.append(("encrypted", "yes"))
    if entry.get("dirty-flag"):
        rows.append(("dirty", "yes"))
    return rows


def command_loaded() -> None:
    """The command's modules are loaded: the garbage collector, off during
    start-up (diskpipe.cli.main), runs again, so a long run over many
    files, each leaving its own garbage, stays bounded."""
    gc.enable()


def cmd_info(args: argparse.Namespace) -> int:
    from diskpipe.formats.batch import REFUSED, inspect_many
    from diskpipe.formats.policy import load_policy

    command_loaded()
    results = inspect_many(
        args.files, jobs=args.jobs, allocation=args.allocation, details=args.details, policy=load_policy(args.policy)
    )
    entries = [result.entry for result in results]
    exit_code = max(
        (EXIT_OK if result.problem is None else EXIT_REFUSED if result.problem == REFUSED else EXIT_USAGE)
        for result in results
    )
    if args.output == "json":
        print_json(entries[0] if len(entries) == 1 else entries)
    else:
        tables = [_info_rows(entry) for entry in entries if "error" not in entry]
        for index, rows in enumerate(tables):
            if index:
                print()
            print_table(rows)
    # Errors go to stderr in both modes: stdout keeps only what was learnt.
    for entry in entries:
        if "error" in entry:
            print(f"diskpipe: {printable(entry['filename'])}: {printable(entry['error'])}", file=sys.stderr)
    return exit_code


def _verdict_of(args: argparse.Namespace, policy: Any) -> Any:
    """The verdict on a file, or on standard input read to its end."""
    from diskpipe.validation import UnsafeImage, ValidatingReader, validate

    if args.file != "-":
        return validate(args.file, claimed=args.claimed_format, policy=policy)
    reader = ValidatingReader(sys.stdin.buffer, claimed=args.claimed_format, policy=policy)
    try:
        while reader.read(1024 * 1024):
            pass
    except UnsafeImage as unsafe:
        return unsafe.verdict
    assert reader.verdict is not None
    return reader.verdict


def cmd_validate(args: argparse.Namespace) -> int:
    from diskpipe.formats import FormatError
    from diskpipe.formats.policy import load_policy

    command_loaded()
    policy = load_policy(args.policy)
    name = "<stdin>" if args.file == "-" else args.file
    result: dict[str, Any] = {"filename": name}
    try:
        verdict = _verdict_of(args, policy)
        if verdict.info is not None and verdict.info.virtual_size:
            info = verdict.info
            result.update(format=info.format, disk_format=info.disk_format, virtual_size=info.virtual_size)
        result.update(verdict.to_json())
        exit_code = EXIT_OK if verdict.safe else EXIT_REFUSED
    except FormatError as error:
        result.update(safe=False, issues=[{"check": "malformed", "message": str(error)}], notes=[])
        exit_code = EXIT_REFUSED
    except OSError as error:
        print(f"diskpipe: {printable(name)}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    if args.output == "json":
        print_json(result)
    else:
        _print_verdict(printable(name), result, exit_code)
    return exit_code


def _print_verdict(name: str, result: dict[str, Any], exit_code: int) -> None:
    if exit_code == EXIT_OK:
        print(f"{name}: safe ({result.get('format', '?')}, disk_format {result.get('disk_format', '?')})")
        for note in result["notes"]:
            print(f"note: {printable(note)}")
        return
    for issue in result["issues"]:
        print(f"{name}: {issue['check']}: {printable(issue['message'])}", file=sys.stderr)
    if result.get("decided") is False:
        for note in result["notes"]:
            print(f"{name}: undecided: {printable(note)}", file=sys.stderr)


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    """Register info and validate; `parent` carries the logging options."""
    info = commands.add_parser(
        "info",
        parents=[parent],
        help="what an image really is, as qemu-img info would say",
        description="Inspect each image without running qemu-img: format, sizes, backing and data files, "
        "what lies inside, and the safety policy's verdict.",
        epilog=epilog(
            "every image inspected (info reports; validate judges)",
            "an image is malformed (the highest code of all files wins)",
            ["diskpipe info disk.qcow2", "diskpipe info --output=json --allocation a.vmdk b.vhd"],
        ),
    )
    info.add_argument("files", nargs="+", metavar="FILE", help="image files to inspect")
    options.add_output(info, "qemu-img info's keys, one object (a list for several files)")
    info.add_argument("--allocation", action="store_true", help="read allocation tables: adds allocated-size")
    info.add_argument("--details", action="store_true", help="deeper facts (ISO volume via pycdlib, libmagic)")
    info.add_argument(
        "--jobs",
        "-j",
        type=int,
        metavar="N",
        help="processes inspecting many files at once (default: automatic, from 64 files on the idle CPUs; "
        "1: this process alone); the output keeps the order the files were given in",
    )
    options.add_policy(info)
    info.set_defaults(handler=cmd_info)

    validate = commands.add_parser(
        "validate",
        parents=[parent],
        help="is an image safe to store? exit 0 safe, 1 unsafe or malformed",
        description="The safety verdict on one image, for a pre-upload step: "
        "the policy's checks, and the claimed format against the real one.",
        epilog=epilog(
            "safe",
            "unsafe or malformed (one reason per line on stderr)",
            [
                "diskpipe validate --claimed-format qcow2 disk.img && openstack image create ...",
                "curl -s https://example.org/disk.vmdk | diskpipe validate --claimed-format vmdk -",
            ],
        ),
    )
    validate.add_argument("file", metavar="FILE|-", help="an image file, or - for standard input")
    options.add_claimed_format(validate)
    options.add_policy(validate)
    options.add_output(validate, "the verdict with its issues and notes")
    validate.set_defaults(handler=cmd_validate)
