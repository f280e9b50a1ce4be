"""The `diskpipe` command's exit codes, and the epilog that lists them
under each sub-command's `--help`."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_OK = 0
EXIT_REFUSED = 1  # refused, unsafe or malformed image
EXIT_USAGE = 2  # usage, setup, I/O or infrastructure error

USAGE_MEANING = "usage, setup or infrastructure error (bad option or config, missing file, broker or store down)"


def epilog(ok: str, refused: str | None, examples: Sequence[str]) -> str:
    """`--help`'s closing text: what each exit code means for this command,
    then examples. `refused` None: the command judges no image (never 1)."""
    lines = ["exit codes:", f"  0  {ok}"]
    if refused is not None:
        lines.append(f"  1  {refused}")
    lines.append(f"  2  {USAGE_MEANING}")
    lines += ["", "examples:", *(f"  {example}" for example in examples)]
    return "\n".join(lines)
