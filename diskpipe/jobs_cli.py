"""The job commands of the `diskpipe` CLI: convert, import, status, list,
cancel, delete, protect, unprotect, cleanup.

Without a broker (`--broker`, `[celery] broker_url` or DISKPIPE_BROKER_URL)
jobs run in this process with the configured store (the file store by
default) and records in a local SQLite file; with one they go to the
Celery workers and records live in Redis.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diskpipe.progress import ProgressDisplay

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
WAIT_POLL = 0.5


def _broker(args: argparse.Namespace) -> str | None:
    from diskpipe.config import load
    from diskpipe.tasks.settings import CeleryConfig, broker_url

    return broker_url(load(CeleryConfig), getattr(args, "broker", None))


def _store_config(args: argparse.Namespace) -> tuple[Any, str | None]:
    from diskpipe.config import load
    from diskpipe.converter.stores.registry import StoreConfig, parse_store_option

    base = load(StoreConfig)
    store = getattr(args, "store", None)
    return parse_store_option(store, base) if store else (base, None)


def _make_store(args: argparse.Namespace) -> Any:
    from diskpipe.converter.stores.registry import make_store

    config, argument = _store_config(args)
    return make_store(config, argument)


def _records(args: argparse.Namespace) -> Any:
    from diskpipe.jobs.connection import redis_client
    from diskpipe.jobs.records import RedisRecords, SqliteRecords

    broker = _broker(args)
    if broker:
        return RedisRecords(redis_client(broker, ride_out_restarts=False))
    config, _ = _store_config(args)
    return SqliteRecords(config.records)


def _exit_for(record: dict[str, Any]) -> int:
    if record["status"] == "active":
        return EXIT_OK
    if record["status"] != "killed":
        return EXIT_OK
    return EXIT_REFUSED if record.get("outcome") == "refused" else EXIT_USAGE


def _print_record(record: dict[str, Any], progress: dict[str, Any] | None, output: str) -> None:
    if output == "json":
        document = dict(record)
        if progress:
            document["progress"] = progress
        print(json.dumps(document, indent=2))
        return
    rows = [
        ("id", record["id"]),
        ("status", record["status"]),
        ("disk_format", record.get("disk_format")),
        ("virtual_size", record.get("virtual_size")),
        ("size", record.get("size")),
        ("checksum", record.get("checksum")),
        ("os_hash_algo", record.get("os_hash_algo")),
        ("os_hash_value", record.get("os_hash_value")),
        ("location", ", ".join(location["url"] for location in record.get("locations") or []) or None),
        ("protected", record.get("protected")),
        ("source", record.get("source")),
        ("reason", record.get("reason")),
        ("updated_at", record.get("updated_at")),
    ]
    if progress and record["status"] in ("queued", "saving"):
        rows.append(("progress", f"{progress.get('stage')} {progress.get('percent', 0):.1f}%"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        if value is not None and value != "":
            print(f"{label:<{width}}  {value}")


# -- convert -------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    import uuid

    from diskpipe.converter.convert import ConversionFailed, ConvertRequest, convert_image
    from diskpipe.converter.stores.base import InvalidImageId, StoreError, StoreUnavailable
    from diskpipe.formats.policy import load_policy
    from diskpipe.progress import ProgressDisplay
    from diskpipe.refusal import UnsafeImage

    store = _make_store(args)
    image_id = args.id or str(uuid.uuid4())
    try:
        request = ConvertRequest(
            source=args.source,
            image_id=image_id,
            to_format=args.to,
            claimed=args.claimed_format,
            policy=load_policy(args.policy),
            full_hashes=not args.no_hashes,
            sparse_hash=args.sparse_hash,
            key_file=args.key_file,
        )
    except InvalidImageId as error:
        print(f"diskpipe: {error}", file=sys.stderr)
        return EXIT_USAGE
    display = ProgressDisplay(enabled=not args.quiet)
    try:
        result = convert_image(request, store, progress=display.update)
    except UnsafeImage as refusal:
        display.close()
        for issue in refusal.issues:
            print(f"diskpipe: {args.source}: {issue.check}: {issue.message}", file=sys.stderr)
        return EXIT_REFUSED
    except ConversionFailed as error:
        display.close()
        print(f"diskpipe: {args.source}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except (StoreUnavailable, StoreError, OSError) as error:
        display.close()
        print(f"diskpipe: {error}", file=sys.stderr)
        return EXIT_USAGE
    display.close()
    document = result.to_json()
    if args.output == "json":
        print(json.dumps(document, indent=2))
    else:
        print(f"stored {document['id']} at {result.location.url}")
        for key in ("virtual_size", "size", "checksum", "os_hash_algo", "os_hash_value", "diskpipe_sparse_hash_value"):
            if key in document:
                print(f"  {key}: {document[key]}")
    return EXIT_OK


# -- import --------------------------------------------------------------------


def _follow(records: Any, image_id: str, display: ProgressDisplay, timeout: float | None = None) -> dict[str, Any]:
    """Poll a record until its job ends, showing progress."""
    import time

    deadline = time.monotonic() + timeout if timeout else None
    while True:
        record = records.get(image_id)
        if record is not None and record["status"] in ("active", "killed", "deleted"):
            display.close()
            return dict(record)
        progress = records.get_progress(image_id)
        if progress:
            display.update(progress.get("stage", "?"), float(progress.get("percent") or 0.0))
        if deadline is not None and time.monotonic() > deadline:
            display.close()
            return dict(record or {"id": image_id, "status": "unknown"})
        time.sleep(WAIT_POLL)


class _ShowingRecords:
    """Passes progress writes to the display (embedded runs are in process)."""

    def __init__(self, records: Any, display: ProgressDisplay) -> None:
        self._records = records
        self._display = display

    def set_progress(self, image_id: str, progress: dict[str, Any]) -> None:
        self._records.set_progress(image_id, progress)
        self._display.update(progress["stage"], float(progress["percent"]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


def cmd_import(args: argparse.Namespace) -> int:
    import os
    import uuid

    from diskpipe.config import load
    from diskpipe.converter.stores.base import InvalidImageId
    from diskpipe.formats.policy import load_policy
    from diskpipe.jobs.pipeline import Environment, ImportJob, ensure_record, is_url, run_import
    from diskpipe.jobs.sources import ImportConfig
    from diskpipe.progress import ProgressDisplay

    image_id = args.id or str(uuid.uuid4())
    source = args.source if is_url(args.source) else os.path.abspath(args.source)
    try:
        job = ImportJob(
            image_id=image_id,
            source=source,
            claimed_format=args.claimed_format,
            name=args.name,
            full_hashes=not args.no_hashes,
            sparse_hash=args.sparse_hash,
        )
    except InvalidImageId as error:
        print(f"diskpipe: {error}", file=sys.stderr)
        return EXIT_USAGE
    broker = _broker(args)
    display = ProgressDisplay(enabled=not args.quiet and args.output != "json")
    records = _records(args)
    if broker:
        if args.store:
            print("diskpipe: with a broker the workers' [store] section decides where images go", file=sys.stderr)
            return EXIT_USAGE
        from celery import Celery

        from diskpipe.config import load
        from diskpipe.jobs.lease import Lease
        from diskpipe.tasks.settings import CeleryConfig

        attempt = str(uuid.uuid4())  # the task's id: a plain UUID, as Celery makes them
        # A record left `saving` with no lease (its worker died) is taken over.
        lease = Lease(records.redis, image_id, owner=attempt)
        record = ensure_record(records, job, attempt, lease_gone=lambda: not lease.held_by_anyone())
        if record.get("task_id") == attempt:
            Celery(broker=broker).send_task(
                "diskpipe.import_image", kwargs=job.to_json(), task_id=attempt, queue=load(CeleryConfig).queue
            )
        if args.no_wait:
            print(image_id)
            return EXIT_OK
        record = _follow(records, image_id, display)
    else:
        environment = Environment(
            records=_ShowingRecords(records, display),
            store=_make_store(args),
            policy=load_policy(args.policy),
            import_config=load(ImportConfig),
            trust_local_paths=True,
        )
        try:
            record = run_import(job, environment, attempt=f"{image_id}.{uuid.uuid4().hex[:8]}")
        finally:
            display.close()
    _print_record(record, None, args.output)
    if record["status"] == "deleted":
        print(f"diskpipe: image {image_id} was deleted; ids are not reused", file=sys.stderr)
        return EXIT_USAGE
    return _exit_for(record)


# -- records -------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    records = _records(args)
    record = records.get(args.id)
    if record is None:
        print(f"diskpipe: no image {args.id}", file=sys.stderr)
        return EXIT_USAGE
    _print_record(record, records.get_progress(args.id), args.output)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    records = _records(args)
    found = records.list()
    if args.output == "json":
        print(json.dumps(found, indent=2))
        return EXIT_OK
    if not found:
        print("no images")
        return EXIT_OK
    print(f"{'ID':<38} {'STATUS':<8} {'FORMAT':<7} {'VIRTUAL SIZE':>14}  UPDATED")
    for record in found:
        virtual = record.get("virtual_size")
        print(
            f"{record['id']:<38} {record['status']:<8} {record.get('disk_format') or '-':<7} "
            f"{virtual if virtual is not None else '-':>14}  {record.get('updated_at', '')}"
        )
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from diskpipe.jobs.pipeline import cancel_image
    from diskpipe.progress import ProgressDisplay

    records = _records(args)
    try:
        record = cancel_image(args.id, records)
    except KeyError:
        print(f"diskpipe: no image {args.id}", file=sys.stderr)
        return EXIT_USAGE
    if record["status"] not in ("active", "killed", "deleted"):
        record = _follow(records, args.id, ProgressDisplay(enabled=False), timeout=args.timeout)
    _print_record(record, None, args.output)
    if record["status"] in ("queued", "saving", "unknown"):
        print(f"diskpipe: {args.id} has not stopped yet", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    from diskpipe.jobs.pipeline import Environment, JobRefused, Transient, delete_image

    broker = _broker(args)
    records = _records(args)
    if records.get(args.id) is None:
        print(f"diskpipe: no image {args.id}", file=sys.stderr)
        return EXIT_USAGE
    if broker:
        from celery import Celery

        from diskpipe.config import load
        from diskpipe.tasks.settings import CeleryConfig

        client = Celery(broker=broker, backend=load(CeleryConfig).result_backend or broker)
        outcome = client.send_task("diskpipe.delete_image", args=[args.id], queue=load(CeleryConfig).queue).get(
            timeout=args.timeout
        )
        if "error" in outcome:
            print(f"diskpipe: {outcome['error']}", file=sys.stderr)
            return EXIT_REFUSED if outcome.get("code") == "refused" else EXIT_USAGE
        record = outcome["record"]
    else:
        try:
            record = delete_image(args.id, Environment(records=records, store=_make_store(args)))
        except JobRefused as error:
            print(f"diskpipe: {error}", file=sys.stderr)
            return EXIT_REFUSED
        except Transient as error:
            print(f"diskpipe: {error}", file=sys.stderr)
            return EXIT_USAGE
    _print_record(record, None, args.output)
    return EXIT_OK


def cmd_protect(args: argparse.Namespace) -> int:
    from diskpipe.jobs.pipeline import set_protected

    try:
        record = set_protected(args.id, _records(args), args.command == "protect")
    except KeyError:
        print(f"diskpipe: no image {args.id}", file=sys.stderr)
        return EXIT_USAGE
    _print_record(record, None, args.output)
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from diskpipe.config import load
    from diskpipe.jobs.sources import ImportConfig, cleanup_staging

    removed = {"store": _make_store(args).cleanup(), "staging": cleanup_staging(load(ImportConfig))}
    print(
        json.dumps(removed, indent=2)
        if args.output == "json"
        else "\n".join(removed["store"] + removed["staging"]) or "nothing to remove"
    )
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Register the job commands on the CLI's subparsers."""

    def common(parser: argparse.ArgumentParser, *, store: bool = True, broker: bool = True) -> None:
        parser.add_argument("--output", choices=("human", "json"), default="human")
        if store:
            from diskpipe.converter.stores import registry

            parser.add_argument("--store", metavar=registry.usage(), help="where images go (default: [store] config)")
        if broker:
            parser.add_argument("--broker", metavar="URL", help="Redis URL of the Celery broker (default: config/env)")

    convert = commands.add_parser("convert", help="convert an image to raw (or qcow2) into a store")
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("--to", choices=("raw", "qcow2"), default="raw")
    convert.add_argument("--id", help="image id (default: a new UUID)")
    convert.add_argument("--claimed-format", metavar="FMT")
    convert.add_argument("--policy", metavar="FILE")
    convert.add_argument("--key-file", metavar="FILE", help="passphrase file for LUKS or encrypted qcow2")
    convert.add_argument(
        "--no-hashes", action="store_true", help="no digest at all: the stored bytes are not hashed (not for Glance!)"
    )
    convert.add_argument("--sparse-hash", action="store_true", help="also publish diskpipe's sparse digest")
    convert.add_argument("--quiet", action="store_true")
    common(convert, broker=False)
    convert.set_defaults(handler=cmd_convert)

    import_ = commands.add_parser("import", help="run the whole import of a file or URL (in process, or via Celery)")
    import_.add_argument("source", metavar="FILE|URL")
    import_.add_argument("--id", help="image id (default: a new UUID)")
    import_.add_argument("--name")
    import_.add_argument("--claimed-format", metavar="FMT")
    import_.add_argument("--policy", metavar="FILE")
    import_.add_argument("--no-wait", action="store_true", help="print the id and return once submitted")
    import_.add_argument("--no-hashes", action="store_true")
    import_.add_argument("--sparse-hash", action="store_true")
    import_.add_argument("--quiet", action="store_true")
    common(import_)
    import_.set_defaults(handler=cmd_import)

    status = commands.add_parser("status", help="an image's record")
    status.add_argument("id")
    common(status)
    status.set_defaults(handler=cmd_status)

    list_ = commands.add_parser("list", help="all image records")
    common(list_)
    list_.set_defaults(handler=cmd_list)

    cancel = commands.add_parser("cancel", help="stop a running import (nothing partial is left)")
    cancel.add_argument("id")
    cancel.add_argument("--timeout", type=float, default=120.0)
    common(cancel)
    cancel.set_defaults(handler=cmd_cancel)

    delete = commands.add_parser("delete", help="delete an image (refused while protected or cloned)")
    delete.add_argument("id")
    delete.add_argument("--timeout", type=float, default=120.0)
    common(delete)
    delete.set_defaults(handler=cmd_delete)

    for name, text in (("protect", "refuse deletes of an image"), ("unprotect", "allow deletes again")):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("id")
        common(parser)
        parser.set_defaults(handler=cmd_protect)

    cleanup = commands.add_parser("cleanup", help="remove temporaries of dead jobs and old staged files")
    common(cleanup, broker=False)
    cleanup.set_defaults(handler=cmd_cleanup)
