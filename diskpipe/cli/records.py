"""The commands on image records: status, list, cancel, delete, protect,
unprotect, and cleanup of what dead jobs left behind."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diskpipe.cli import context, options
from diskpipe.cli.exits import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, epilog
from diskpipe.cli.output import print_json, print_record, print_record_list, printable

STILL_RUNNING = ("queued", "saving", "unknown")


def _no_image(image_id: str) -> int:
    print(f"diskpipe: no image {printable(image_id)}", file=sys.stderr)
    return EXIT_USAGE


def cmd_status(args: argparse.Namespace) -> int:
    records = context.records(args)
    record = records.get(args.id)
    if record is None:
        return _no_image(args.id)
    print_record(record, records.get_progress(args.id), args.output)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    found = context.records(args).list()
    if args.output == "json":
        print_json(found)
    else:
        print_record_list(found)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from diskpipe.cli.imports import follow
    from diskpipe.jobs.management import cancel_image
    from diskpipe.progress import ProgressDisplay

    records = context.records(args)
    try:
        record = cancel_image(args.id, records)
    except KeyError:
        return _no_image(args.id)
    if record["status"] not in ("active", "killed", "deleted"):
        record = follow(records, args.id, ProgressDisplay(enabled=False), timeout=args.timeout)
    print_record(record, None, args.output)
    if record["status"] in STILL_RUNNING:
        print(f"diskpipe: {printable(args.id)} has not stopped yet", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _by_workers(args: argparse.Namespace, url: str, task: str, *task_args: Any) -> tuple[Any, int]:
    """Run a management task on the workers (their store): its answer, or
    None and the exit code when no worker answered."""
    from celery.exceptions import TimeoutError as NoAnswer

    result = context.send_task(url, task, args=list(task_args))
    try:
        return result.get(timeout=args.timeout), EXIT_OK
    except NoAnswer:
        print(f"diskpipe: no worker answered within {args.timeout:g} s; is one running?", file=sys.stderr)
        return None, EXIT_USAGE
    finally:  # now, not from a destructor at interpreter exit (a traceback then)
        result.backend.remove_pending_result(result)


def _delete_by_workers(args: argparse.Namespace, url: str) -> tuple[dict[str, Any] | None, int]:
    outcome, code = _by_workers(args, url, "diskpipe.delete_image", args.id)
    if outcome is None:
        return None, code
    if "error" in outcome:
        print(f"diskpipe: {printable(outcome['error'])}", file=sys.stderr)
        return None, EXIT_REFUSED if outcome.get("code") == "refused" else EXIT_USAGE
    return outcome["record"], EXIT_OK


def _delete_here(args: argparse.Namespace, records: Any) -> tuple[dict[str, Any] | None, int]:
    from diskpipe.jobs.errors import JobRefused, Transient
    from diskpipe.jobs.management import delete_image
    from diskpipe.jobs.pipeline import Environment

    try:
        return delete_image(args.id, Environment(records=records, store=context.make_store(args))), EXIT_OK
    except JobRefused as error:
        print(f"diskpipe: {printable(str(error))}", file=sys.stderr)
        return None, EXIT_REFUSED
    except Transient as error:
        print(f"diskpipe: {printable(str(error))}", file=sys.stderr)
        return None, EXIT_USAGE


def _store_beside_broker(args: argparse.Namespace, url: str | None, doing: str) -> bool:
    """--store with a broker names a store the workers never use: said, and
    True (a usage error)."""
    if url and args.store:
        print(
            f"diskpipe: --store cannot be used with a broker ({context.shown_url(url)}): "
            f"the workers {doing} their own [store]",
            file=sys.stderr,
        )
        return True
    return False


def cmd_delete(args: argparse.Namespace) -> int:
    url = context.broker(args)
    if _store_beside_broker(args, url, "delete from"):
        return EXIT_USAGE
    records = context.records(args)
    if records.get(args.id) is None:
        return _no_image(args.id)
    record, code = _delete_by_workers(args, url) if url else _delete_here(args, records)
    if record is not None:
        print_record(record, None, args.output)
    return code


def cmd_protect(args: argparse.Namespace) -> int:
    """Protect in the record and in the store: with a broker the workers do
    it (their store), without one this process does."""
    from diskpipe.jobs.errors import Transient
    from diskpipe.jobs.management import set_protected
    from diskpipe.jobs.pipeline import Environment

    protected = args.command == "protect"
    url = context.broker(args)
    records = context.records(args)  # with a broker: fails fast when it cannot be reached
    if records.get(args.id) is None:
        return _no_image(args.id)
    if url:
        outcome, code = _by_workers(args, url, "diskpipe.protect_image", args.id, protected)
        if outcome is None:
            return code
        if "error" in outcome:
            return _no_image(args.id)
        record = outcome["record"]
    else:
        try:
            record = set_protected(
                args.id, Environment(records=context.records(args), store=context.make_store(args)), protected
            )
        except KeyError:
            return _no_image(args.id)
        except Transient as error:
            print(f"diskpipe: {printable(str(error))}", file=sys.stderr)
            return EXIT_USAGE
    print_record(record, None, args.output)
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    """The store's leftovers and old staged files; with a broker the
    workers' own pass (their store and staging, leases for liveness)."""
    from diskpipe.config import load
    from diskpipe.jobs.cleanup import clean, describe
    from diskpipe.jobs.sources import ImportConfig

    url = context.broker(args)
    if _store_beside_broker(args, url, "clean"):
        return EXIT_USAGE
    if url:
        context.records(args)  # fails fast, naming the broker, when it cannot be reached
        report, code = _by_workers(args, url, "diskpipe.cleanup")
        if report is None:
            return code
    else:
        report = clean(context.make_store(args), load(ImportConfig))
    removed, kept = describe(report)
    if args.output == "json":
        print_json(report)
    elif removed or not kept:
        print("\n".join(printable(line) for line in removed) or "nothing to remove")
    for line in kept:
        print(f"diskpipe: {printable(line)}", file=sys.stderr)
    return EXIT_USAGE if kept else EXIT_OK


_WORKER_TIMEOUT = "with a broker: seconds to wait for a worker (120)"


def _add(
    commands: Any,
    parent: argparse.ArgumentParser,
    name: str,
    help_text: str,
    *,
    handler: Any,
    output: str,
    takes_id: bool = True,
    timeout: str | None = None,
    store: str | None = None,
    **texts: Any,
) -> None:
    """One record command: its id, --timeout (when it waits), --output, --broker, --store (when it
    can work without workers), in that order, and its handler."""
    parser = commands.add_parser(
        name,
        parents=[parent],
        help=help_text,
        description=texts.get("description", help_text[0].upper() + help_text[1:] + "."),
        epilog=epilog(texts["ok"], texts.get("refused"), texts["examples"]),
    )
    if takes_id:
        parser.add_argument("id", metavar="ID", help="the image id")
    if timeout is not None:
        parser.add_argument("--timeout", type=float, default=120.0, help=timeout)
    options.add_output(parser, output)
    options.add_broker(parser)
    if store is not None:
        options.add_store(parser, what=store)
    parser.set_defaults(handler=handler)


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    _add(
        commands,
        parent,
        "status",
        "an image's record: every field, and the progress of a running job",
        handler=cmd_status,
        output="the record as stored (sizes in bytes), with its progress",
        ok="the record was found",
        examples=["diskpipe status 7b4c0f3e-...", "diskpipe status 7b4c0f3e-... --output=json | jq .outcome"],
    )
    _add(
        commands,
        parent,
        "list",
        "all image records, one line each",
        handler=cmd_list,
        output="the records as stored (sizes in bytes)",
        takes_id=False,
        ok="listed (also when there are none)",
        examples=["diskpipe list", "diskpipe list --output=json | jq '.[] | select(.status == \"killed\")'"],
    )
    _add(
        commands,
        parent,
        "cancel",
        "stop a running import (nothing partial is left)",
        handler=cmd_cancel,
        output="the record once stopped",
        timeout="seconds to wait for the job to stop (120)",
        ok="the job has stopped (or had already ended)",
        examples=["diskpipe cancel 7b4c0f3e-...", "diskpipe cancel 7b4c0f3e-... --timeout 600"],
    )
    _add(
        commands,
        parent,
        "delete",
        "delete an image (refused while protected or cloned)",
        handler=cmd_delete,
        output="the deleted record",
        timeout=_WORKER_TIMEOUT,
        store="without a broker: the store to delete from",
        description="Delete a stored image and mark its record deleted; ids are not reused. With a broker "
        "a worker deletes it from the workers' [store].",
        ok="deleted",
        refused="refused: the image is protected, being saved, or has clones",
        examples=["diskpipe delete 7b4c0f3e-...", "diskpipe unprotect 7b4c0f3e-... && diskpipe delete 7b4c0f3e-..."],
    )
    for name, text in (("protect", "refuse deletes of an image"), ("unprotect", "allow deletes of an image again")):
        _add(
            commands,
            parent,
            name,
            text,
            handler=cmd_protect,
            output="the record",
            timeout=_WORKER_TIMEOUT,
            ok="done",
            examples=[f"diskpipe {name} 7b4c0f3e-..."],
        )
    _add(
        commands,
        parent,
        "cleanup",
        "remove temporaries of dead jobs and old staged files",
        handler=cmd_cleanup,
        output="what was removed and what was left, and why",
        takes_id=False,
        timeout=_WORKER_TIMEOUT,
        store="without a broker: the store to clean",
        description="Remove the store's temporaries whose job is gone and staged files older than a day "
        "(run it from cron; workers do the same when they start).",
        ok="cleaned (the names removed are printed); 2 when something could not be removed (why, on stderr)",
        examples=[
            "diskpipe cleanup",
            "diskpipe cleanup --store rbd:images --output=json",
            "diskpipe cleanup --broker redis://redis:6379/0",
        ],
    )
