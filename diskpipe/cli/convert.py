"""`diskpipe convert`: one image into a store, in this process, no record."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diskpipe.cli import context, options
from diskpipe.cli.exits import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, epilog
from diskpipe.cli.output import print_json, printable

RESULT_KEYS = ("virtual_size", "size", "checksum", "os_hash_algo", "os_hash_value", "diskpipe_sparse_hash_value")


def _request(args: argparse.Namespace) -> Any:
    import uuid

    from diskpipe.converter.convert import ConvertRequest
    from diskpipe.formats.policy import load_policy

    return ConvertRequest(
        source=args.source,
        image_id=args.id or str(uuid.uuid4()),
        to_format=args.to,
        claimed=args.claimed_format,
        policy=load_policy(args.policy),
        full_hashes=not args.no_hashes,
        sparse_hash=args.sparse_hash,
        key_file=args.key_file,
    )


def _convert(args: argparse.Namespace, request: Any, store: Any) -> tuple[Any, int]:
    """(result or None, exit code); a failure is said on stderr."""
    from diskpipe.converter.convert import ConversionFailed, convert_image
    from diskpipe.converter.stores.base import StoreError, StoreUnavailable
    from diskpipe.progress import ProgressDisplay
    from diskpipe.refusal import UnsafeImage

    display = ProgressDisplay(enabled=not args.quiet)
    try:
        result = convert_image(request, store, progress=display.update)
    except (UnsafeImage, ConversionFailed, StoreUnavailable, StoreError, OSError) as error:
        display.close()  # before the message: no bar left half drawn over it
        return None, _said(args.source, error)
    except BaseException:
        display.close()
        raise
    display.close(completed=True)
    return result, EXIT_OK


def _said(source: str, error: Exception) -> int:
    """Say why a conversion failed; the exit code for it."""
    from diskpipe.converter.convert import ConversionFailed
    from diskpipe.refusal import UnsafeImage

    if isinstance(error, UnsafeImage):
        for issue in error.issues:
            print(f"diskpipe: {printable(source)}: {issue.check}: {printable(issue.message)}", file=sys.stderr)
        return EXIT_REFUSED
    if isinstance(error, ConversionFailed):
        print(f"diskpipe: {printable(source)}: {printable(str(error))}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"diskpipe: {printable(str(error))}", file=sys.stderr)  # the store or the file system
    return EXIT_USAGE


def cmd_convert(args: argparse.Namespace) -> int:
    from diskpipe.converter.stores.base import InvalidImageId

    store = context.make_store(args)
    try:
        request = _request(args)
    except InvalidImageId as error:
        print(f"diskpipe: {error}", file=sys.stderr)
        return EXIT_USAGE
    result, code = _convert(args, request, store)
    if result is None:
        return code
    document = result.to_json()
    if args.output == "json":
        print_json(document)
    else:
        print(f"stored {document['id']} at {result.location.url}")
        for key in RESULT_KEYS:
            if key in document:
                print(f"  {key}: {document[key]}")
    return EXIT_OK


def add_command(commands: Any, parent: argparse.ArgumentParser) -> None:
    convert = commands.add_parser(
        "convert",
        parents=[parent],
        help="convert an image to raw (or qcow2) into a store",
        description="Inspect, validate, convert, checksum and store one image, in this process "
        "(no broker, no record): a progress bar on a terminal.",
        epilog=epilog(
            "stored",
            "refused: unsafe, malformed, or qemu-img could not convert it",
            ["diskpipe convert disk.vmdk --store file:/srv/images", "diskpipe convert disk.qcow2 --store rbd:images"],
        ),
    )
    convert.add_argument("source", metavar="SRC", help="the image file")
    convert.add_argument("--to", choices=("raw", "qcow2"), default="raw", help="the stored format (default raw)")
    convert.add_argument("--id", help="image id, the name in the store (default: a new UUID)")
    options.add_claimed_format(convert)
    options.add_policy(convert)
    convert.add_argument("--key-file", metavar="FILE", help="passphrase file for LUKS or encrypted qcow2")
    convert.add_argument(
        "--no-hashes", action="store_true", help="no digest at all: the stored bytes are not hashed (not for Glance!)"
    )
    convert.add_argument("--sparse-hash", action="store_true", help="also publish diskpipe's sparse digest")
    convert.add_argument("--quiet", action="store_true", help="no progress display")
    options.add_output(convert, "the stored image's Glance fields")
    options.add_store(convert)
    convert.set_defaults(handler=cmd_convert)
