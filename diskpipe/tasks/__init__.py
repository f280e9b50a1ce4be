"""Celery workers for diskpipe's jobs: `celery -A diskpipe.tasks worker`.

The app is built by `factory.create_app` on first use of `diskpipe.tasks.app`
(not when this package is imported), after Celery's command line has set
`-b`/CELERY_BROKER_URL. (No submodule may be named `app`: importing it would
set `diskpipe.tasks.app` to the module, and `from diskpipe.tasks import app`
would hand out the module instead of the Celery app.) The job machinery itself lives in `diskpipe.jobs`;
the tasks here only hand it a worker's environment and turn its record into
a task state.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `celery -A diskpipe.tasks` looks for `app` (or `celery`) here.
    if name in ("app", "celery"):
        from diskpipe.tasks.factory import default_app

        return default_app()
    raise AttributeError(f"module 'diskpipe.tasks' has no attribute {name!r}")
