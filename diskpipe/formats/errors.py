"""The one error type that broken image data raises."""

from __future__ import annotations


class FormatError(ValueError):
    """An image is not a valid instance of the format its header claims.

    Raised for truncated, fuzzed or self-contradictory structures. The message
    names the format, the field and the byte offset, so an operator can tell
    what is wrong without a hex editor.
    """

    def __init__(
        self,
        fmt: str,
        message: str,
        *,
        offset: int | None = None,
        field: str | None = None,
    ) -> None:
        self.format = fmt
        self.offset = offset
        self.field = field
        where = []
        if field is not None:
            where.append(field)
        if offset is not None:
            where.append(f"at offset {offset}")
        suffix = f" ({', '.join(where)})" if where else ""
        super().__init__(f"{fmt}: {message}{suffix}")


class Unavailable(Exception):
    """A stream has already passed the bytes an inspector asked for.

    Only the stream driver raises it, inside an inspector generator; facts
    that depend on such bytes are left unset in stream mode.
    """
