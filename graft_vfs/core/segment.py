"""Segments: immutable objects of zstd-compressed pages with an index and checksums.

Layout (all integers big-endian)::

    b"GRFTSEG2" | u32 count | u32 index_len | index | u32 crc32(everything before) | blobs

``index`` is msgpack: a list of ``[page, offset, length, crc]`` with absolute byte
offsets of each page's zstd frame, sorted by page. Each page is compressed on its own,
so a reader can fetch one page, or a run of adjacent pages, with one ranged read.

A frame's ``crc`` (``frame_crc``) is the CRC-32 of the page number (u64) followed by the
frame: it binds the frame to its page, so a frame served for another page (a server's
mix-up, a wrong offset) fails the check like a flipped byte. The LSN that wrote a page
cannot be bound here: a segment is written (and may be uploaded) before its commit has
an LSN, and compaction moves frames between segments without changing their version.
Format 1 (``GRFTSEG1``, crc of the frame alone) is refused with a clear error.

Every frame is exactly one zstd frame that declares a content size of PAGE_SIZE, with
nothing after it. A decoder checks that declaration before it decompresses anything:
zstd allocates what a frame declares, so a 64 KiB frame could otherwise claim 2 GiB.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Collection, Iterable, Iterator
from typing import NamedTuple

import msgpack
import zstandard

from graft_vfs.core.btree import is_interior
from graft_vfs.core.errors import CorruptData, InvalidRequest
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.ids import PAGE_SIZE

MAGIC = b"GRFTSEG2"
OLD_MAGIC = b"GRFTSEG1"  # frame crcs that did not cover the page number
_HEADER = struct.Struct(">8sII")
HEADER_SIZE = _HEADER.size
ZSTD_LEVEL = 3
# The most pages one segment holds: what a client sends in one request (a push splits
# into segments of this size) and what compaction writes. A bigger one is refused.
MAX_SEGMENT_PAGES = 2048
_U32 = 1 << 32
_PAGE_NO = struct.Struct(">Q")


class Entry(NamedTuple):
    """Where one page's compressed frame lives inside a segment."""

    page: int
    offset: int
    length: int
    crc: int


def frame_crc(page: int, frame: bytes) -> int:
    """The checksum of ``page``'s frame: CRC-32 of the u64 page number, then the frame."""
    return zlib.crc32(frame, zlib.crc32(_PAGE_NO.pack(page)))


def encode_segment(pages: Iterable[tuple[int, bytes]]) -> tuple[bytes, list[Entry]]:
    """Build a segment from ``(page, 4096 bytes)`` pairs; returns (bytes, index)."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    frames = []
    for page, data in sorted(pages):
        if len(data) != PAGE_SIZE:
            raise InvalidRequest(f"page {page} has {len(data)} bytes, expected {PAGE_SIZE}")
        frames.append((page, cctx.compress(data)))
    return encode_frames(frames)


def upper_first(pages: Iterable[int], upper: Collection[int], size: int) -> list[list[int]]:
    """Pages in segments of at most ``size``, sorted by page, the ``upper`` ones (page 1
    and interior B-tree pages, see ``upper_pages``) in a segment of their own, first.

    A cold reader (a server whose cache is empty, a client's opening) reads B-trees'
    upper levels first: kept together they are a few ranged reads of one segment
    instead of one per page scattered over all the segments of a large commit. Pages
    that fit in one segment stay in one (a segment is sorted by page).
    """
    pages = sorted(pages)
    groups = [pages]
    if len(pages) > size:
        # One segment of them at most: a server checking the commit's hash merges its
        # segments in page order, holding this one and one other (MAX_OPEN_SEGMENTS).
        first = [p for p in pages if p in upper][:size]
        taken = set(first)
        groups = [first, [p for p in pages if p not in taken]]
    return [group[i : i + size] for group in groups for i in range(0, len(group), size)]


def upper_pages(pages: Iterable[tuple[int, bytes]]) -> set[int]:
    """Which of ``(page, content)`` are page 1 or interior B-tree pages."""
    return {p for p, data in pages if p == 0 or is_interior(data, p)}


def encode_frames(frames: Iterable[tuple[int, bytes]]) -> tuple[bytes, list[Entry]]:
    """Build a segment from already compressed ``(page, frame)`` pairs (compaction)."""
    items = sorted(frames)
    if len(items) > MAX_SEGMENT_PAGES:
        raise InvalidRequest(f"{len(items)} pages in one segment, at most {MAX_SEGMENT_PAGES}")
    # The index holds absolute offsets, which depend on the index's own size:
    # msgpack ints grow with value, so iterate until the size is stable.
    index_len = 0
    while True:
        off = HEADER_SIZE + index_len + 4
        entries = []
        for page, blob in items:
            entries.append(Entry(page, off, len(blob), frame_crc(page, blob)))
            off += len(blob)
        packed: bytes = msgpack.packb([list(e) for e in entries])
        if len(packed) == index_len:
            break
        index_len = len(packed)
    head = _HEADER.pack(MAGIC, len(entries), index_len) + packed
    head += struct.pack(">I", zlib.crc32(head))
    return head + b"".join(blob for _, blob in items), entries


def segment_head_size(prefix: bytes) -> int:
    """From the first HEADER_SIZE bytes, how many bytes hold the header and index."""
    _, _, index_len = _parse_header(prefix)
    return HEADER_SIZE + index_len + 4


def _parse_header(prefix: bytes) -> tuple[bytes, int, int]:
    if len(prefix) < HEADER_SIZE:
        raise CorruptData("segment is truncated (no header)")
    magic, count, index_len = _HEADER.unpack_from(prefix)
    if magic == OLD_MAGIC:
        raise CorruptData(
            "segment of format 1 (written by a graft-vfs before frame checksums bound their "
            "page): export the volume with the version that wrote it and import it anew"
        )
    if magic != MAGIC:
        raise CorruptData("not a graft segment (bad magic)")
    if count > MAX_SEGMENT_PAGES or index_len > count * 32 + 16:
        raise CorruptData("segment header is out of range")
    return magic, count, index_len


def decode_index(head: bytes) -> list[Entry]:
    """Parse and verify a segment's header and index (the first bytes of it)."""
    _, count, index_len = _parse_header(head)
    end = HEADER_SIZE + index_len
    if len(head) < end + 4:
        raise CorruptData("segment is truncated (index)")
    (crc,) = struct.unpack_from(">I", head, end)
    if zlib.crc32(head[:end]) != crc:
        raise CorruptData("segment index checksum mismatch")
    try:
        raw = msgpack.unpackb(head[HEADER_SIZE:end])
        entries = [Entry(int(p), int(o), int(n), int(c)) for p, o, n, c in raw]
    except Exception as exc:
        raise CorruptData("segment index is unreadable") from exc
    if len(entries) != count:
        raise CorruptData("segment index count mismatch")
    for e in entries:
        if not (0 <= e.page < MAX_PAGES and 0 <= e.offset and 0 < e.length and 0 <= e.crc < _U32):
            raise CorruptData(f"segment index entry {list(e)} is out of range")
    return entries


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one may not be shared between threads; making one
    per page cost as much as decompressing it)."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def decompress_page(frame: bytes, page: int) -> bytes:
    """One page from its zstd frame, never allocating more than PAGE_SIZE for it.

    python-zstandard allocates the content size a frame declares, whatever
    ``max_output_size`` says, so the declaration is checked first.
    """
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise CorruptData(f"page {page} is not a zstd frame") from exc
    if declared != PAGE_SIZE:
        shown = "no size" if declared == zstandard.CONTENTSIZE_UNKNOWN else f"{declared} bytes"
        raise CorruptData(f"page {page}'s frame declares {shown}, not {PAGE_SIZE}")
    try:
        data = _decompressor().decompress(
            frame, max_output_size=PAGE_SIZE, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CorruptData(f"page {page} does not decompress as one frame: {exc}") from exc
    if len(data) != PAGE_SIZE:
        raise CorruptData(f"page {page} decompressed to {len(data)} bytes")
    return data


def decode_page(entry: Entry, blob: bytes) -> bytes:
    """Verify (length, crc bound to ``entry.page``) and decompress one page's frame."""
    if len(blob) != entry.length or frame_crc(entry.page, blob) != entry.crc:
        raise CorruptData(f"checksum mismatch for page {entry.page}")
    return decompress_page(blob, entry.page)


def coalesce_runs(entries: Iterable[Entry], gap: int) -> list[list[Entry]]:
    """Group entries (by offset) into runs whose neighbours are at most ``gap`` bytes apart:
    each run is one ranged read of one segment."""
    runs: list[list[Entry]] = []
    end = 0  # where the current run's bytes end
    for e in sorted(entries, key=lambda e: e.offset):
        if runs and e.offset - end <= gap:
            runs[-1].append(e)
            end = max(end, e.offset + e.length)
        else:
            runs.append([e])
            end = e.offset + e.length
    return runs


def iter_segment(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Verify a whole segment, yielding its ``(page, bytes)`` pairs by page, one at a time.

    The layout (index, offsets, total length) is checked before the first pair, each
    page as it is yielded: the segment is good only once the iteration ends without
    CorruptData. A consumer that keeps nothing (``verify_segment``) holds one page.
    """
    entries = decode_index(data)
    last = -1
    end = segment_head_size(data)
    for e in entries:
        if e.page <= last or e.offset != end:
            raise CorruptData("segment index is not contiguous and sorted")
        last = e.page
        end = e.offset + e.length
    if end != len(data):
        raise CorruptData("segment length does not match its index")
    for e in entries:
        yield e.page, decode_page(e, data[e.offset : e.offset + e.length])


def verify_segment(data: bytes) -> list[Entry]:
    """Check every byte of a segment (index, each frame's checksum and size); return its index."""
    for _ in iter_segment(data):
        pass
    return decode_index(data)


def decode_segment(data: bytes) -> list[tuple[int, bytes]]:
    """Verify a whole segment and return its ``(page, bytes)`` pairs, sorted by page."""
    return list(iter_segment(data))
