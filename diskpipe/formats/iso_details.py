"""Deeper ISO facts through pycdlib (opt-in: pycdlib costs ~57 ms at import).

pycdlib parses the directory tree too, so it also finds damage the volume
descriptors alone do not show; its own exceptions become `FormatError`.
"""

from __future__ import annotations

from typing import Any

from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Content

PLATFORMS = {0: "x86", 1: "ppc", 2: "mac", 0xEF: "efi"}
MEDIA_TYPES = {0: "no-emulation", 1: "1.2M floppy", 2: "1.44M floppy", 3: "2.88M floppy", 4: "hard disk"}


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("latin-1").rstrip(" \0")
    return str(raw)


def _boot_entry(entry: Any, platform: int) -> dict[str, Any]:
    return {
        "platform": PLATFORMS.get(platform, str(platform)),
        "bootable": entry.boot_indicator == 0x88,
        "media": MEDIA_TYPES.get(entry.boot_media_type, str(entry.boot_media_type)),
        "sector-count": entry.sector_count,
        "load-rba": entry.load_rba,
    }


def describe(path: str, content: Content) -> Content:
    import pycdlib  # heavy; only --details pays for it

    iso = pycdlib.PyCdlib()
    try:
        iso.open(path)
    except Exception as error:
        raise FormatError("iso", f"pycdlib cannot read the volume: {error}") from error
    try:
        pvd = iso.pvd
        details = dict(content.details)
        details.update(
            {
                "volume-id": _text(pvd.volume_identifier),
                "system-id": _text(pvd.system_identifier),
                "publisher": _text(getattr(pvd.publisher_identifier, "text", b"")),
                "application": _text(getattr(pvd.application_identifier, "text", b"")),
                "joliet": iso.has_joliet(),
                "rock-ridge": iso.has_rock_ridge() or None,
                "udf": iso.has_udf(),
                "hybrid-mbr": iso.isohybrid_mbr is not None,
            }
        )
        catalog = iso.eltorito_boot_catalog
        if catalog is not None:
            platform = catalog.validation_entry.platform_id
            entries = [_boot_entry(catalog.initial_entry, platform)]
            for section in catalog.sections:
                for entry in section.section_entries:
                    entries.append(_boot_entry(entry, section.platform_id))
            details["el-torito-entries"] = entries
        return Content(content.kind, content.name, details)
    except Exception as error:
        raise FormatError("iso", f"pycdlib cannot describe the volume: {error}") from error
    finally:
        iso.close()
