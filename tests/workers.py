"""What the tests need to run real Celery workers: a diskpipe.toml written
from sections, and worker processes, each in a process group of its own,
taken as started once its log says ready and it answers a ping through the
broker, and stopped whole."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, wait_until


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write `sections` (name -> key -> str, int, bool or a list of them) to
    `path` as TOML. JSON's spelling of those values is TOML's."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def answers_ping(broker: str, name: str) -> bool:
    """The worker `name` takes control messages through `broker`: it is
    consuming, not just started."""
    from celery import Celery
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = Celery(broker=broker)
    try:
        return bool(client.control.ping(destination=[f"{name}@{socket.gethostname()}"], timeout=5))
    except (OSError, OperationalError, RedisConnectionError):
        # A connection Redis dropped (a restart earlier in the session, a
        # busy machine): not an answer yet; the caller asks again.
        return False
    finally:
        client.close()


@dataclass
class Worker:
    """One `celery worker` process group and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Celery's warm shutdown (SIGTERM to the main process), then the
        whole group killed if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children."""
        with contextlib.suppress(ProcessLookupError):  # already gone with its whole group
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_worker(command: list[str], env: dict[str, str], log: Path, name: str, broker: str) -> Worker:
    """Start `command` (a celery worker named `name`) and wait until it
    consumes: its log says ready and it answers a ping through `broker`."""
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [*command, "-n", f"{name}@%h"],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(name, process, log)

    def ready() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"worker {name} exited:\n{worker.text()[-3000:]}")
        if " ready." not in worker.text():
            return "no 'ready.' in its log"
        return None if answers_ping(broker, name) else "no answer to ping"

    try:
        # Polled often: a test (or a fixture) waits on every start.
        wait_until(ready, f"worker {name} consuming", interval=0.2)
    except BaseException:
        worker.kill()
        raise
    return worker
