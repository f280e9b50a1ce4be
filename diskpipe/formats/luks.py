"""LUKS: version 1 is qemu's `luks` driver; version 2 is raw to qemu 7.2.

docs/formats.md §7. No key is needed for any fact here; the payload itself stays
opaque, which the policy notes.
"""

from __future__ import annotations

from diskpipe.formats.base import ContainerFormat, InspectOptions
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Content, Facts
from diskpipe.formats.layout import Layout, c_string, round_up
from diskpipe.formats.reads import GetSize

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "luks"
MAGIC = b"LUKS\xba\xbe"
MAGIC2_SECONDARY = b"SKUL\xba\xbe"
HEADER = Layout(NAME, "LUKS1 header", ">", """
    0    6s   magic
    6    H    version
    8    32s  cipher_name
    40   32s  cipher_mode
    72   32s  hash_spec
    104  I    payload_offset
    108  I    key_bytes
    112  20s  mk_digest
    132  32s  mk_digest_salt
    164  I    mk_digest_iterations
    168  40s  uuid
""")  # fmt: skip
KEY_SLOT = Layout(NAME, "key slot", ">", """
    0   I    active
    4   I    iterations
    8   32s  salt
    40  I    key_offset
    44  I    stripes
""")  # fmt: skip
LUKS2_HEADER = Layout(NAME, "LUKS2 header", ">", """
    0    6s   magic
    6    H    version
    8    Q    header_size
    16   Q    sequence_id
    24   48s  label
    72   32s  checksum_algorithm
    104  64x  salt
    168  40s  uuid
    208  48x  subsystem
    256  Q    header_offset
""")  # fmt: skip
SLOTS_OFFSET = 208
SLOT_COUNT = 8
HEADER_SIZE = SLOTS_OFFSET + SLOT_COUNT * KEY_SLOT.size  # 592
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
STRIPES = 4000
HEADER_SECTORS = -(-HEADER_SIZE // 512)
KNOWN_CIPHERS = {"aes", "cast5", "serpent", "twofish", "sm4"}
KNOWN_HASHES = {"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3"}


def probe(buffer: bytes) -> bool:
    return buffer[:6] == MAGIC and int.from_bytes(buffer[6:8], "big") == 1


def describe(raw: bytes) -> dict[str, Any]:
    """qemu's `format-specific` data for a LUKS1 header; FormatError if qemu
    would refuse it."""
    header = HEADER.parse(raw)
    if header["magic"] != MAGIC or header["version"] != 1:
        raise FormatError(NAME, "not a LUKS1 header", offset=0)
    cipher = c_string(header["cipher_name"])
    mode_spec = c_string(header["cipher_mode"])
    hash_name = c_string(header["hash_spec"])
    key_bytes = header["key_bytes"]
    if cipher not in KNOWN_CIPHERS:
        raise FormatError(NAME, f"unsupported cipher '{cipher}'", field="cipher_name", offset=8)
    if hash_name not in KNOWN_HASHES:
        raise FormatError(NAME, f"unsupported hash '{hash_name}'", field="hash_spec", offset=72)
    mode, _, ivgen = mode_spec.partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    key_bits = key_bytes * 8 // (2 if mode == "xts" else 1)
    if key_bits not in (128, 192, 256) or not mode:
        raise FormatError(NAME, f"unsupported key size {key_bytes} for {mode_spec}", field="key_bytes", offset=108)
    payload_offset = header["payload_offset"]
    if payload_offset < HEADER_SECTORS:
        raise FormatError(NAME, "LUKS payload is overlapping with the header", field="payload_offset", offset=104)
    key_sectors = -(-key_bytes * STRIPES // 512)
    slots = _key_slots(raw, key_sectors, payload_offset)
    data: dict[str, Any] = {
        "ivgen-alg": ivgen_alg,
        "hash-alg": hash_name,
        "cipher-alg": f"{cipher}-{key_bits}",
        "uuid": c_string(header["uuid"]),
        "cipher-mode": mode,
        "slots": slots,
        "payload-offset": payload_offset * 512,
        "master-key-iters": header["mk_digest_iterations"],
    }
    if ivgen_hash:
        data["ivgen-hash-alg"] = ivgen_hash
    return data


def _key_slots(raw: bytes, key_sectors: int, payload_offset: int) -> list[dict[str, Any]]:
    """The key slots as qemu reports them, checked as qemu checks them."""
    slots: list[dict[str, Any]] = []
    spans: list[tuple[int, int]] = []
    for index in range(SLOT_COUNT):
        slot = KEY_SLOT.parse(raw, SLOTS_OFFSET + index * KEY_SLOT.size)
        where = SLOTS_OFFSET + index * KEY_SLOT.size
        if slot["active"] not in (SLOT_ACTIVE, SLOT_INACTIVE):
            raise FormatError(NAME, f"keyslot {index} state is invalid", offset=where)
        if slot["stripes"] != STRIPES:
            raise FormatError(
                NAME, f"keyslot {index} is corrupted (stripes {slot['stripes']} != {STRIPES})", offset=where
            )
        start, end = slot["key_offset"], slot["key_offset"] + key_sectors
        if start < HEADER_SECTORS:
            raise FormatError(NAME, f"keyslot {index} is overlapping with the LUKS header", offset=where)
        if end > payload_offset:
            raise FormatError(NAME, f"keyslot {index} is overlapping with the encrypted payload", offset=where)
        for other_index, (other_start, other_end) in enumerate(spans):
            if start < other_end and other_start < end:
                raise FormatError(NAME, f"keyslots {other_index} and {index} are overlapping", offset=where)
        spans.append((start, end))
        entry: dict[str, Any] = {"active": slot["active"] == SLOT_ACTIVE, "key-offset": start * 512}
        if entry["active"]:
            entry["iters"] = slot["iterations"]
            entry["stripes"] = slot["stripes"]
        slots.append(entry)
    return slots


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    data = describe(head)
    file_size: int = yield GetSize()
    payload_bytes = data["payload-offset"]
    if file_size < payload_bytes:
        raise FormatError(NAME, f"file ({file_size} bytes) ends before the payload at {payload_bytes}")
    return Facts(
        format=NAME,
        virtual_size=round_up(file_size, 512) - payload_bytes,
        encrypted=True,
        subformat="luks1",
        format_specific={"type": NAME, "data": data},
        details={"luks-version": 1, "payload-offset": payload_bytes},
    )


def sniff_luks2(head: bytes) -> Content | None:
    """LUKS2 (and any other non-1 version): raw to qemu 7.2, opaque to us."""
    if head[:6] != MAGIC or int.from_bytes(head[6:8], "big") == 1:
        return None
    version = int.from_bytes(head[6:8], "big")
    details: dict[str, Any] = {"version": version}
    if version == 2 and len(head) >= LUKS2_HEADER.size:
        header = LUKS2_HEADER.parse(head)
        details["uuid"] = c_string(header["uuid"])
        details["header-size"] = header["header_size"]
    return Content("luks", f"luks{version}", details)


FORMAT = ContainerFormat(NAME, probe, inspect)
