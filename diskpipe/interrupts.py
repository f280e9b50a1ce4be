"""Stopping a command that writes a temporary image, on any stop signal.

Ctrl-C (SIGINT), SIGTERM (systemd, `kill`, a container runtime) and SIGHUP
(the terminal went away) all take the path Ctrl-C already takes: the first
one raises `Interrupted`, a KeyboardInterrupt, in the main thread, so every
`except BaseException`/`finally` on the way out does its cleanup — qemu-img's
process group is killed (`qemu_img.run`), the temporary image is removed
(`convert_image` aborts the target), the staged files are closed (they have
no name), and an import's record ends `killed` with outcome `cancelled`
(`pipeline`). A message goes to stderr at once, so whoever sent the signal
knows the command heard it and is cleaning up.

A second signal does not interrupt that cleanup (a hurried second Ctrl-C
would otherwise leave the temporary behind); a third one quits at once and
leaves the temporary to `diskpipe cleanup`. The exit status is 128 + the
signal number (130, 143, 129), what a shell reports for a command the signal
ended. A stop signal that was ignored when the command started (`nohup`, a
script's background job) stays ignored.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

# By name: `signal` is imported only by a command that installs the handler
# (the CLI imports this module on every start, `diskpipe info` included).
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
# The commands that write a temporary image; the others keep Python's
# default handling (a SIGTERM ends `diskpipe info` at once, as it should).
WRITING_COMMANDS = frozenset({"convert", "import"})
QUIT_AT_ONCE_AFTER = 3  # signals


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Stopper:
    """The handler: counts the signals and says what happens."""

    def __init__(self) -> None:
        self.received = 0

    def _say(self, text: str) -> None:
        # A progress line may be on the terminal: start a fresh line. After
        # SIGHUP the terminal may be gone (EIO): the cleanup matters more.
        try:
            fresh = "\n" if sys.stderr is not None and sys.stderr.isatty() else ""
            os.write(2, f"{fresh}diskpipe: {text}\n".encode())
        except (OSError, ValueError):
            pass

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        import signal

        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1:
            self._say(f"stopping: removing the temporary image ({name})")
            raise Interrupted(signum)
        if self.received < QUIT_AT_ONCE_AFTER:
            self._say(
                f"still stopping ({name}); once more quits at once and leaves the temporary to `diskpipe cleanup`"
            )
            return
        self._say(f"quitting at once ({name}); `diskpipe cleanup` removes what is left")
        os._exit(128 + signum)


def _ignored(signum: int) -> bool:
    import signal

    return signal.getsignal(signum) == signal.SIG_IGN


def run(handler: Callable[[Any], int], args: Any) -> int:
    """Run a CLI command (`handler(args)`); for a writing command, a stop
    signal makes it clean up and return 128 + the signal's number."""
    if getattr(args, "command", None) not in WRITING_COMMANDS:
        return handler(args)
    import signal

    stopper = _Stopper()
    # A signal ignored when we started stays ignored, as in every Unix tool:
    # `nohup diskpipe import ...` must outlive its terminal (SIGHUP), and a
    # shell starts a background job of a script with SIGINT ignored, so the
    # script's Ctrl-C is not meant for it.
    wanted = [signum for signum in (signal.Signals[name] for name in STOP_SIGNALS) if not _ignored(signum)]
    previous = {signum: signal.signal(signum, stopper) for signum in wanted}
    try:
        return handler(args)
    except Interrupted as stop:
        # The handler stays: a signal between here and the exit is "still
        # stopping", not a kill that would hide the exit status.
        return stop.exit_code
    finally:
        if not stopper.received:
            for signum, action in previous.items():
                signal.signal(signum, action)
