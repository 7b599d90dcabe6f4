"""Hostile zstd frames, for the tests that show they are refused before decompression."""

from __future__ import annotations

import struct


def zstd_bomb(declared: int) -> bytes:
    """One zstd frame that declares ``declared`` bytes of zeros and holds them as RLE
    blocks: 4 bytes per 128 KiB, so 64 KiB of frame decompress to 2 GiB."""
    block = 128 * 1024
    out = bytearray(struct.pack("<IBQ", 0xFD2FB528, 0xE0, declared))
    left = declared
    while left:
        n = min(block, left)
        left -= n
        out += (n << 3 | 1 << 1 | (left == 0)).to_bytes(3, "little") + b"\0"
    return bytes(out)
