"""hash_image: reading ahead on a thread must not change a digest, and a read
error must surface (not hang the hashing threads)."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from diskpipe.converter.checksums import READ_PIECE, SPARSE_BLOCK, hash_image

MIB = 1 << 20


def scattered_image(seed: int) -> tuple[bytearray, list[tuple[int, int, bool]]]:
    """A 40 MiB image with data runs of random lengths (some longer than a
    read piece, some unaligned), zero runs between them, and extents that
    say where the data is."""
    rng = random.Random(seed)
    image = bytearray(40 * MIB)
    extents: list[tuple[int, int, bool]] = []
    position = rng.randrange(0, 3 * MIB)
    while position < len(image):
        length = min(rng.choice((4096, 70_000, READ_PIECE + 12_345, 9 * MIB)), len(image) - position)
        image[position : position + length] = rng.randbytes(length)
        extents.append((position, length, True))
        position += length + rng.randrange(SPARSE_BLOCK, 5 * MIB)
    return image, extents


def sparse_reference(image: bytes) -> str:
    digest = hashlib.sha256()
    for offset in range(0, len(image), SPARSE_BLOCK):
        block = image[offset : offset + SPARSE_BLOCK]
        if any(block):
            digest.update(offset.to_bytes(8, "big"))
            digest.update(block)
    digest.update(len(image).to_bytes(8, "big"))
    return digest.hexdigest()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_digests_equal_hashing_every_byte(seed: int) -> None:
    image, extents = scattered_image(seed)
    reads: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return bytes(image[offset : offset + length])

    sums = hash_image(len(image), extents, read_at, full=True, sparse=True)
    assert sums.size == len(image)
    assert sums.md5 == hashlib.md5(image).hexdigest()
    assert sums.sha512 == hashlib.sha512(image).hexdigest()
    assert sums.sparse == sparse_reference(bytes(image))
    # Only data is read, in order, in pieces no larger than READ_PIECE.
    assert reads == sorted(reads)
    assert max(length for _, length in reads) <= READ_PIECE
    assert sum(length for _, length in reads) < len(image)


def test_a_read_error_surfaces_and_stops_every_thread() -> None:
    image, extents = scattered_image(4)
    calls = 0

    def failing_read(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("the store went away")
        return bytes(image[offset : offset + length])

    before = threading.active_count()
    with pytest.raises(OSError, match="went away"):
        hash_image(len(image), extents, failing_read, full=True, sparse=True)
    assert threading.active_count() == before


def test_a_short_read_is_an_error() -> None:
    image, extents = scattered_image(5)
    with pytest.raises(OSError, match="short read"):
        hash_image(len(image), extents, lambda offset, length: bytes(image[offset : offset + length - 1]))


def test_cancelling_stops_the_hashing() -> None:
    image, extents = scattered_image(6)
    with pytest.raises(InterruptedError):
        hash_image(len(image), extents, lambda o, n: bytes(image[o : o + n]), cancelled=lambda: True)
