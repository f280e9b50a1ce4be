"""`diskpipe import`: the whole pipeline for a file or URL, in this process
(no broker) or through the Celery workers (with one).

A local path is checked before anything is recorded or sent, by the rules
that will open it (diskpipe.jobs.sources.open_local): with a broker those
of the workers' `[import] allowed_dirs`, without one any regular file this
user can read. A path that fails is a usage error (exit 2) and leaves no
record: nothing was queued.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from diskpipe.cli import context, options
from diskpipe.cli.exits import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, epilog
from diskpipe.cli.output import print_record, printable

if TYPE_CHECKING:
    from diskpipe.jobs.pipeline import ImportJob
    from diskpipe.progress import ProgressDisplay

log = logging.getLogger(__name__)
WAIT_POLL = 0.5  # seconds between looks at a record while following a job
ENDED = ("active", "killed", "deleted")


def exit_for(record: dict[str, Any]) -> int:
    """0 active; 1 killed because of the image (outcome refused); 2 any
    other end (infrastructure, cancel, deleted), which says nothing about it."""
    if record["status"] == "active":
        return EXIT_OK
    if record["status"] == "killed" and record.get("outcome") == "refused":
        return EXIT_REFUSED
    return EXIT_USAGE


def local_source_problem(path: str, *, with_broker: bool) -> str | None:
    """Why a local path cannot be imported, or None: it is opened (and
    closed again) by the rules the import itself will use."""
    from dataclasses import replace

    from diskpipe.config import load
    from diskpipe.jobs.sources import ImportConfig, SourceRefused, open_local

    config = load(ImportConfig)
    if not with_broker:
        # As the embedded import opens it (pipeline._fetch): the operator's own path.
        config = replace(config, allowed_dirs=("/",), allow_hard_links=True)
    try:
        open_local(path, config).close()
    except SourceRefused as refusal:
        return str(refusal)
    return None


def follow(records: Any, image_id: str, display: ProgressDisplay, timeout: float | None = None) -> dict[str, Any]:
    """Poll a record until its job ends (or `timeout`), showing progress."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        record = records.get(image_id)
        if record is not None and record["status"] in ENDED:
            display.close(completed=record["status"] == "active")
            return dict(record)
        progress = records.get_progress(image_id)
        if progress:
            display.update(str(progress.get("stage", "?")), float(progress.get("percent") or 0.0))
        if deadline is not None and time.monotonic() > deadline:
            display.close()
            return dict(record or {"id": image_id, "status": "unknown"})
        time.sleep(WAIT_POLL)


class ShowingRecords:
    """Passes progress writes to the display (embedded runs are in process)."""

    def __init__(self, records: Any, display: ProgressDisplay) -> None:
        self._records = records
        self._display = display

    def set_progress(self, image_id: str, progress: dict[str, Any]) -> None:
        self._records.set_progress(image_id, progress)
        self._display.update(progress["stage"], float(progress["percent"]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


def _job(args: argparse.Namespace) -> ImportJob:
    import uuid

    from diskpipe.jobs.pipeline import ImportJob, is_url

    return ImportJob(
        image_id=args.id or str(uuid.uuid4()),
        source=args.source if is_url(args.source) else os.path.abspath(args.source),
        claimed_format=args.claimed_format,
        name=args.name,
        full_hashes=not args.no_hashes,
        sparse_hash=args.sparse_hash,
    )


def _submit(job: ImportJob, url: str, args: argparse.Namespace, display: ProgressDisplay) -> dict[str, Any] | None:
    """Record and send the job to the workers; its final record, or None
    with --no-wait."""
    import uuid

    from diskpipe.jobs.admission import ensure_record
    from diskpipe.jobs.lease import Lease

    records = context.redis_records(url)
    context.check_result_backend(url)
    attempt = str(uuid.uuid4())  # the Celery task id, and the record's task_id
    # A record left `saving` with no lease (its worker died) is taken over.
    lease = Lease(records.redis, job.image_id, owner=attempt)
    record = ensure_record(records, job, attempt, lease_gone=lambda: not lease.held_by_anyone())
    if record.get("task_id") == attempt:
        try:
            context.send_task(url, "diskpipe.import_image", kwargs=job.to_json(), task_id=attempt)
        except context.BrokerUnreachable as error:
            _end_unsent(records, job.image_id, attempt, error)
            raise
        log.info("image %s: sent to the workers as task %s", job.image_id, attempt)
    if args.no_wait:
        print(job.image_id)
        return None
    return follow(records, job.image_id, display)


def _end_unsent(records: Any, image_id: str, attempt: str, error: Exception) -> None:
    """A record queued for a task that could not be sent ends killed (failed):
    no worker will ever take it. (Broker and result backend answered just
    before the record was made: this is a race.)"""
    from diskpipe.jobs.states import IllegalTransition

    record = records.get(image_id)
    if record is None or record.get("task_id") != attempt or record["status"] != "queued":
        return
    with contextlib.suppress(IllegalTransition):  # it changed meanwhile: not ours to end
        records.transition(image_id, "queued", "killed", outcome="failed", reason=f"not sent: {error}")


def _run_here(job: ImportJob, args: argparse.Namespace, display: ProgressDisplay) -> dict[str, Any]:
    import uuid

    from diskpipe.config import load
    from diskpipe.formats.policy import load_policy
    from diskpipe.jobs.pipeline import Environment, run_import
    from diskpipe.jobs.sources import ImportConfig

    environment = Environment(
        records=ShowingRecords(context.records(args), display),
        store=context.make_store(args),
        policy=load_policy(args.policy),
        import_config=load(ImportConfig),
        trust_local_paths=True,
    )
    record: dict[str, Any] | None = None
    try:
        record = run_import(job, environment, attempt=str(uuid.uuid4()))
    finally:
        display.close(completed=record is not None and record["status"] == "active")
    return record


def _usage_problem(args: argparse.Namespace, job: ImportJob, url: str | None) -> str | None:
    """What makes this import a usage error before anything is recorded."""
    from diskpipe.jobs.pipeline import is_url

    if url and (args.store or args.policy):
        option = "--store" if args.store else "--policy"
        return (
            f"{option} cannot be used with a broker ({context.shown_url(url)}): the workers' own "
            "configuration ([store], [policy]) decides; leave it out, or import without a broker"
        )
    if is_url(job.source):
        return None
    problem = local_source_problem(job.source, with_broker=bool(url))
    return None if problem is None else f"cannot import: {printable(problem)}"


def cmd_import(args: argparse.Namespace) -> int:
    from diskpipe.converter.stores.base import InvalidImageId
    from diskpipe.progress import ProgressDisplay

    try:
        job = _job(args)
    except InvalidImageId as error:
        print(f"diskpipe: {printable(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    url = context.broker(args)
    problem = _usage_problem(args, job, url)
    if problem is not None:
        print(f"diskpipe: {problem}", file=sys.stderr)
        return EXIT_USAGE
    display = ProgressDisplay(enabled=not args.quiet and args.output != "json")
    record = _submit(job, url, args, display) if url else _run_here(job, args, display)
    if record is None:
        return EXIT_OK
    print_record(record, None, args.output)
    if record["status"] == "killed":
        # stdout may be a JSON document or a table: the reason also goes to stderr.
        print(f"diskpipe: {printable(str(record.get('reason')))}", file=sys.stderr)
    if record["status"] == "deleted":
        print(f"diskpipe: image {job.image_id} was deleted; ids are not reused", file=sys.stderr)
    return exit_for(record)


def add_command(commands: Any, parent: argparse.ArgumentParser) -> None:
    import_ = commands.add_parser(
        "import",
        parents=[parent],
        help="run the whole import of a file or URL (in process, or via Celery)",
        description="Fetch, unpack, inspect, convert, checksum and store one image, recording each step. "
        "Without a broker the job runs in this process, into the store --store or [store] names, with "
        "records in a local SQLite file; with a broker the workers run it into their own [store], "
        "by their own [policy] (so --store and --policy are refused with --broker).",
        epilog=epilog(
            "the image is stored (record active)",
            "the image or its source was refused (record killed, outcome refused)",
            [
                "diskpipe import disk.qcow2 --name debian-12",
                "diskpipe import https://example.org/disk.vmdk --broker redis://127.0.0.1:6379/0 --no-wait",
            ],
        )
        + "\n\nA local path that is missing, unreadable, not a regular file or (with a broker) outside the "
        "workers' [import] allowed_dirs is exit 2 and leaves no record.",
    )
    import_.add_argument("source", metavar="FILE|URL", help="a local file, or an http(s) URL (Glance's web-download)")
    import_.add_argument("--id", help="image id (default: a new UUID); an id is never reused once deleted")
    import_.add_argument("--name", help="the image's name in its record")
    options.add_claimed_format(import_)
    import_.add_argument("--no-wait", action="store_true", help="with a broker: print the id once sent and return")
    import_.add_argument("--no-hashes", action="store_true", help="no md5/sha512 (not for Glance!)")
    import_.add_argument("--sparse-hash", action="store_true", help="also publish diskpipe's sparse digest")
    import_.add_argument("--quiet", action="store_true", help="no progress display")
    options.add_output(import_, "the final record (Glance's field names)")
    options.add_broker(import_)
    options.add_store(import_, what="without a broker: where the image goes")
    options.add_policy(import_)
    import_.set_defaults(handler=cmd_import)
