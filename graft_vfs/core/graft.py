"""Grafts: compact bitmaps of page indexes (pyroaring, portable serialization)."""

from __future__ import annotations

from collections.abc import Iterable

from pyroaring import BitMap

from graft_vfs.core.errors import InvalidRequest

MAX_PAGES = 1 << 31  # page indexes fit SQLite's 32-bit page numbers
MAX_PAGES_PER_READ = 4096  # pages one read request may ask for (protocol limit)


def encode_graft(pages: Iterable[int] | BitMap) -> bytes:
    """Serialize a set of page indexes in roaring's portable format."""
    bm = pages if isinstance(pages, BitMap) else BitMap(pages)
    return bm.serialize()


def decode_graft(data: object) -> BitMap:
    """Deserialize an untrusted graft; malformed input raises InvalidRequest."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest("a graft must be binary (roaring portable format)")
    if not data:
        return BitMap()
    try:
        bm = BitMap.deserialize(bytes(data))
    except Exception as exc:  # pyroaring raises ValueError or IndexError
        raise InvalidRequest("malformed graft bitmap") from exc
    if bm and bm.max() >= MAX_PAGES:
        raise InvalidRequest(f"graft names page {bm.max()}, beyond the largest page index")
    return bm
