"""What the commands print: aligned tables, human sizes, records.

Human mode is for people (sizes in KiB/MiB/GiB, every field of a record
spelled out); `--output=json` is for programs and keeps exact bytes and
the record as stored.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
# The record's fields in the order a person reads them; any other field
# follows in name order, so a field added to records is shown too.
RECORD_ORDER = (
    "id", "name", "status", "outcome", "reason", "disk_format", "container_format", "source_format",
    "virtual_size", "size", "checksum", "os_hash_algo", "os_hash_value", "locations", "protected",
    "source", "claimed_format", "attempts", "retry", "task_id", "owner", "created_at", "updated_at",
)  # fmt: skip
LIST_NAME_WIDTH = 40  # a longer name is cut in `list` (whole in `status`)
# C0 and C1 controls and DEL: a name, source or reason comes from a user,
# and a terminal would obey an escape sequence or a carriage return in it.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """`text` with control characters shown as \\xNN escapes."""
    return text.translate(_CONTROLS)


def shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def human_size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in SIZE_UNITS:
        if size < 1024 or unit == SIZE_UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable: the last unit takes any size")


def size_with_bytes(value: int | None) -> str:
    """`1.5 GiB (1610612736 bytes)`; plain bytes below 1 KiB."""
    if value is None:
        return "-"
    text = human_size(value)
    return text if value < 1024 else f"{text} ({value} bytes)"


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def print_json(document: Any) -> None:
    import json  # off the `diskpipe info` path unless asked for

    print(json.dumps(document, indent=2))


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        import json

        return printable(json.dumps(value, separators=(", ", ": "), ensure_ascii=False))
    return printable(str(value))


def _locations_text(locations: list[dict[str, Any]]) -> str:
    return printable(", ".join(str(location.get("url")) for location in locations))


def _retry_text(retry: dict[str, Any]) -> str:
    return f"attempt {retry.get('attempt')} of {retry.get('of')}"


_FIELD_TEXTS: dict[str, Callable[[Any], str]] = {
    "virtual_size": size_with_bytes,
    "size": size_with_bytes,
    "source_virtual_size": size_with_bytes,
    "locations": _locations_text,
    "retry": _retry_text,
}


def _field_text(name: str, value: Any) -> str:
    if value is None or value in ("", []):
        return "-"
    special = _FIELD_TEXTS.get(name)
    try:
        return special(value) if special is not None else _value_text(value)
    except (TypeError, AttributeError, ValueError):  # a field of an unexpected shape: shown as it is
        return _value_text(value)


def progress_text(progress: dict[str, Any]) -> str:
    text = f"{printable(str(progress.get('stage', '?')))} {float(progress.get('percent') or 0):.1f}%"
    if progress.get("bytes"):
        text += f" ({human_size(int(progress['bytes']))})"
    return text


def record_rows(record: dict[str, Any], progress: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Every field of the record, known ones first; then its progress."""
    names = [name for name in RECORD_ORDER if name in record]
    names += sorted(name for name in record if name not in RECORD_ORDER)
    rows = [(name, _field_text(name, record[name])) for name in names]
    if progress:
        rows.append(("progress", progress_text(progress)))
    return rows


def print_record(record: dict[str, Any], progress: dict[str, Any] | None, output: str) -> None:
    if output == "json":
        document = dict(record)
        if progress:
            document["progress"] = progress
        print_json(document)
    else:
        print_table(record_rows(record, progress))


def print_record_list(records: Sequence[dict[str, Any]]) -> None:
    """`diskpipe list` for people: one line per image, sizes in units."""
    if not records:
        print("no images")
        return
    rows = [("ID", "NAME", "STATUS", "OUTCOME", "FORMAT", "VIRTUAL", "SIZE", "UPDATED")]
    for record in records:
        rows.append(
            (
                printable(str(record["id"])),
                shortened(printable(str(record.get("name") or "-")), LIST_NAME_WIDTH),
                str(record["status"]),
                str(record.get("outcome") or "-"),
                str(record.get("disk_format") or "-"),
                human_size(record.get("virtual_size")),
                human_size(record.get("size")),
                str(record.get("updated_at") or "-"),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    right_aligned = {5, 6}  # the sizes
    for row in rows:
        cells = [
            cell.rjust(widths[column]) if column in right_aligned else cell.ljust(widths[column])
            for column, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())
