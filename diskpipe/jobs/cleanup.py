"""One cleanup pass: the store's abandoned temporaries and old staged files,
each named with what happened to it, for the command line and the workers'
`diskpipe.cleanup` task alike (so the two print the same thing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diskpipe.converter.stores.base import Store
from diskpipe.jobs.sources import ImportConfig, cleanup_staging

# {"store": [{"name", "removed", "why"?}...], "staging": [...]}: plain JSON, as
# it crosses the broker from a worker.
Report = dict[str, list[dict[str, Any]]]


def clean(
    store: Store, import_config: ImportConfig, is_live: Callable[[str, str], bool | None] | None = None
) -> Report:
    """Remove what dead jobs left; `is_live` as in `Store.cleanup`."""
    return {
        "store": [leftover.to_json() for leftover in store.cleanup(is_live)],
        "staging": [{"name": name, "removed": True} for name in cleanup_staging(import_config)],
    }


def describe(report: Report) -> tuple[list[str], list[str]]:
    """The report as lines: (what was removed, what could not be and why)."""
    removed, kept = [], []
    for place, items in report.items():
        for item in items:
            if item.get("removed"):
                removed.append(f"removed {place} {item['name']}")
            else:
                kept.append(f"could not remove {place} {item['name']}: {item.get('why') or 'no reason given'}")
    return removed, kept
