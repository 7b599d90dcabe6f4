"""Commit records (one per LSN in a volume's log) and the commit content hash.

A record names the segments its commit wrote and where each page's frame lives in them.
Format LOG4 stores those entries as packed little-endian columns (``PageEntries``), so
a record decodes in a few bulk operations whatever its size: an import's record of
32,596 pages decodes in about 3 ms, where LOG3 (a msgpack list of 4 integers per page,
still decoded: stores written before keep working) took about 190 ms of a cold
server's CPU before its first answer, with the page map built from it. The columns are
checked in bulk before any entry is used: equal lengths, pages strictly ascending and
below the page count, lengths not zero, offsets in range.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyroaring import BitMap

from graft_vfs.core.envelope import Fields, Packable, check_int, pack, unpack
from graft_vfs.core.errors import CorruptData, GraftError
from graft_vfs.core.graft import MAX_PAGES, decode_graft, encode_graft
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_segment_id, validate_volume_id
from graft_vfs.core.segment import Entry

# LOG1 was the unchecksummed msgpack record; LOG2 held frame crcs of segment format 1;
# LOG3 held a msgpack row per page, decoded still (see ``ROW_RECORD_KIND``).
RECORD_KIND = b"LOG4"
ROW_RECORD_KIND = b"LOG3"
HASH_SIZE = 32  # sha256
MAX_OFFSET = (1 << 63) - 1
MAX_CRC = (1 << 32) - 1
# Packed columns: array typecodes of 4 and 8 bytes, little-endian in the store.
U32, U64 = "I", "Q"
assert array(U32).itemsize == 4 and array(U64).itemsize == 8
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def pack_column(values: array[int]) -> bytes:
    """An array's items as little-endian bytes."""
    if _BIG_ENDIAN_HOST:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def unpack_column(
    data: bytes, code: str, count: int | None, bad: Callable[[str], CorruptData]
) -> array[int]:
    """The column ``pack_column`` made: ``count`` items of ``code`` (any number if None)."""
    values = array(code)
    if len(data) % values.itemsize:
        raise bad(f"has {len(data)} bytes, not a whole number of {values.itemsize}-byte integers")
    if count is not None and len(data) != count * values.itemsize:
        raise bad(f"has {len(data) // values.itemsize} integers, not {count}")
    values.frombytes(data)
    if _BIG_ENDIAN_HOST:
        values.byteswap()
    return values


class PageEntries:
    """Entries of one segment as columns, pages strictly ascending: where each page's
    frame lives without a Python object per page until one is asked for (``find``)."""

    __slots__ = ("pages", "offsets", "lengths", "crcs", "_bitmap")

    def __init__(
        self, pages: array[int], offsets: array[int], lengths: array[int], crcs: array[int]
    ) -> None:
        assert len(pages) == len(offsets) == len(lengths) == len(crcs)
        self.pages, self.offsets, self.lengths, self.crcs = pages, offsets, lengths, crcs
        self._bitmap: BitMap | None = None

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> PageEntries:
        """Columns of ``entries`` (sorted here). OverflowError for a value that does not
        fit its column (a length of 4 GiB or more: no frame of a 4 KiB page is)."""
        rows = sorted(entries)
        cols: list[Iterable[int]] = [list(col) for col in zip(*rows)] if rows else [[]] * 4
        return cls(
            array(U32, cols[0]), array(U64, cols[1]), array(U32, cols[2]), array(U32, cols[3])
        )

    @property
    def bitmap(self) -> BitMap:
        """The pages, as a bitmap: ``rank`` of a page is its row + 1 (pages ascend)."""
        if self._bitmap is None:
            self._bitmap = BitMap(self.pages)
        return self._bitmap

    def __len__(self) -> int:
        return len(self.pages)

    def row(self, page: int) -> int | None:
        """The row of ``page`` in the columns; None if they do not hold it."""
        bitmap = self.bitmap
        return bitmap.rank(page) - 1 if page in bitmap else None

    def find(self, page: int) -> Entry | None:
        """The entry of ``page``; None if this segment does not hold it."""
        i = self.row(page)
        if i is None:
            return None
        return Entry(page, self.offsets[i], self.lengths[i], self.crcs[i])

    def entries(self) -> list[Entry]:
        return list(map(Entry, self.pages, self.offsets, self.lengths, self.crcs))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageEntries):
            return NotImplemented
        mine = (self.pages, self.offsets, self.lengths, self.crcs)
        return mine == (other.pages, other.offsets, other.lengths, other.crcs)

    __hash__ = None  # type: ignore[assignment]


class CommitHasher:
    """The content hash of a commit, fed one page at a time in ascending page order.

    The server recomputes it from the pages a commit carries without holding them all.
    """

    def __init__(self, vid: str, base_lsn: int, page_count: int, nonce: bytes = b"") -> None:
        self._h = hashlib.sha256()
        self._h.update(b"graft-commit-v1\0" + vid.encode() + b"\0")
        self._h.update(struct.pack(">QQ", base_lsn, page_count))
        if nonce:  # one push's random bytes: see commit_hash
            self._h.update(b"nonce\0" + nonce)
        self._last = -1

    def add(self, page: int, data: bytes) -> None:
        if page <= self._last:
            raise ValueError(f"page {page} after page {self._last}: pages must ascend")
        self._last = page
        self._h.update(struct.pack(">Q", page))
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()


NONCE_SIZE = 16


def commit_hash(
    vid: str,
    base_lsn: int,
    page_count: int,
    pages: Iterable[tuple[int, bytes]],
    nonce: bytes = b"",
) -> bytes:
    """Content hash that identifies a commit, so a retried push is never applied twice.

    Computed over the uncompressed pages in page order, so it does not depend on the
    compressor's version or settings. ``nonce`` (NONCE_SIZE random bytes a push draws
    once and keeps for its retries) makes the hash one push's: without it, two clients
    committing the same bytes on the same base would have one hash, and the second
    would be answered as a retry of the first, its update lost.
    """
    hasher = CommitHasher(vid, base_lsn, page_count, nonce)
    for page, data in sorted(pages):
        hasher.add(page, data)
    return hasher.digest()


class SegmentRef:
    """A segment a commit wrote, with the index of the pages it holds (as columns)."""

    __slots__ = ("sid", "columns")

    def __init__(self, sid: str, entries: Iterable[Entry] | PageEntries) -> None:
        self.sid = sid
        self.columns = entries if isinstance(entries, PageEntries) else PageEntries.of(entries)

    @property
    def entries(self) -> list[Entry]:
        """The index, an Entry per page (made on each call: keep what you need)."""
        return self.columns.entries()

    def pages(self) -> BitMap:
        return BitMap(self.columns.bitmap)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SegmentRef):
            return NotImplemented
        return self.sid == other.sid and self.columns == other.columns

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SegmentRef({self.sid!r}, {len(self.columns)} pages)"


@dataclass
class CommitRecord:
    """``volumes/{vid}/log/{lsn:020d}``: what one LSN changed, in the volume ``volume_id``."""

    vid: str
    volume_id: bytes
    lsn: int
    page_count: int
    hash: bytes
    timestamp: float
    segments: list[SegmentRef] = field(default_factory=list)
    # A fork's first record: the volume and LSN whose snapshot it starts from (its
    # segments are that snapshot's page map, pointing at the source's segments).
    origin: tuple[str, int] | None = None

    def pages(self) -> BitMap:
        bm = BitMap()
        for seg in self.segments:
            bm |= seg.pages()
        return bm

    def encode(self) -> bytes:
        origin: dict[str, Packable] = {} if self.origin is None else {"origin": list(self.origin)}
        return pack(
            RECORD_KIND,
            {
                **origin,
                "vid": self.vid,
                "volume_id": self.volume_id,
                "lsn": self.lsn,
                "page_count": self.page_count,
                "hash": self.hash,
                "time": self.timestamp,
                "pages": encode_graft(self.pages()),
                "segments": [
                    {
                        "sid": s.sid,
                        "pages": pack_column(s.columns.pages),
                        "offsets": pack_column(s.columns.offsets),
                        "lengths": pack_column(s.columns.lengths),
                        "crcs": pack_column(s.columns.crcs),
                    }
                    for s in self.segments
                ],
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> CommitRecord:
        """The record in ``data`` (LOG4, or LOG3 as written before); CorruptData unless
        every field and every entry checks out."""
        rows = data[4:8] in (ROW_RECORD_KIND, b"LOG2")  # LOG2: refused, with how to fix
        f = unpack(ROW_RECORD_KIND if rows else RECORD_KIND, data, "commit record")
        page_count = f.integer("page_count", 0, MAX_PAGES - 1)
        segments = []
        seen = BitMap()
        for raw in f.sequence("segments"):
            if not isinstance(raw, dict):
                raise f.bad("segments", "holds a non-map")
            seg = Fields(raw, f.what)
            if rows:
                columns = _row_entries(seg, page_count)
            else:
                columns = _column_entries(seg, page_count)
            pages = columns.bitmap
            if seen.intersection_cardinality(pages):
                raise f.bad("segments", "name a page twice")
            seen |= pages
            segments.append(SegmentRef(seg.text("sid", validate_segment_id), columns))
        rec = cls(
            vid=f.text("vid", validate_volume_id),
            volume_id=f.blob("volume_id", IDENTITY_SIZE),
            lsn=f.integer("lsn", 1, MAX_LSN),
            page_count=page_count,
            hash=f.blob("hash", HASH_SIZE),
            timestamp=f.number("time"),
            segments=segments,
            origin=_origin(f) if "origin" in f.d else None,
        )
        try:
            listed = decode_graft(f.get("pages"))
        except GraftError as exc:
            raise f.bad("pages", str(exc)) from None
        if listed != seen:
            raise CorruptData("commit record page bitmap does not match its segments")
        return rec


def _column_entries(seg: Fields, page_count: int) -> PageEntries:
    """A LOG4 segment's entries, every column checked in bulk before any is used."""
    return packed_entries(seg, page_count)


def packed_column(f: Fields, name: str, code: str, count: int | None) -> array[int]:
    """Field ``name`` of ``f``: ``count`` packed integers of ``code`` (any number: None)."""
    value = f.get(name)
    if not isinstance(value, bytes):
        raise f.bad(name, "is not packed integers")
    return unpack_column(value, code, count, lambda why: f.bad(name, why))


def packed_entries(f: Fields, page_count: int) -> PageEntries:
    """The packed columns ``pages``, ``offsets``, ``lengths``, ``crcs`` of ``f`` (a LOG4
    segment, a CKP4 map), checked in bulk: equal lengths, pages strictly ascending and
    below ``page_count``, no zero length, offsets below 2**63 (any u32 is a crc)."""
    pages = packed_column(f, "pages", U32, None)
    n = len(pages)
    columns = PageEntries(
        pages,
        packed_column(f, "offsets", U64, n),
        packed_column(f, "lengths", U32, n),
        packed_column(f, "crcs", U32, n),
    )
    if n:
        bitmap = columns.bitmap
        # Strictly ascending: the bitmap (sorted, without duplicates) reads back the same.
        if len(bitmap) != n or bitmap.to_array() != pages:
            raise f.bad("pages", "are not strictly ascending")
        if bitmap.max() >= page_count:
            raise f.bad("pages", f"name a page at or beyond the page count {page_count}")
        if has_zero_u32(pack_column(columns.lengths)):
            raise f.bad("lengths", "hold a zero length")
        if not below_2_63(pack_column(columns.offsets)):
            raise f.bad("offsets", f"hold an offset beyond {MAX_OFFSET}")
    return columns


# Range checks of packed columns on their bytes, in C: min() and max() over the arrays
# made an int object per value and took 3.4 ms of the 5.6 ms decoding a record of
# 32,596 pages; these take about 0.2 ms.
_LOW_HALF = bytes(range(0x80))


def has_zero_u32(packed: bytes) -> bool:
    """Whether packed little-endian u32s hold a zero: OR the 4 byte lanes of every value
    together (as big integers), and look for a zero byte in the result."""
    n = len(packed) // 4
    lanes = 0
    for lane in range(4):
        lanes |= int.from_bytes(packed[lane::4], "little")
    return b"\0" in lanes.to_bytes(n, "little")


def below_2_63(packed: bytes) -> bool:
    """Whether every packed little-endian u64 is at most 2**63 - 1 (its top bit clear)."""
    return not packed[7::8].translate(None, _LOW_HALF)


def _row_entries(seg: Fields, page_count: int) -> PageEntries:
    """A LOG3 segment's entries (a list of 4 integers per page), as columns."""
    entries = _entries(seg, seg.sequence("index"), page_count)
    try:
        columns = PageEntries.of(entries)
    except OverflowError:
        raise seg.bad("index", "holds a length of 4 GiB or more") from None
    if len(columns.bitmap) != len(entries):
        raise seg.bad("index", "names a page twice")
    return columns


def _origin(f: Fields) -> tuple[str, int]:
    raw = f.get("origin")
    if not isinstance(raw, list) or len(raw) != 2:
        raise f.bad("origin", "is not a volume and an LSN")
    origin = Fields({"vid": raw[0], "lsn": raw[1]}, f.what)
    return origin.text("vid", validate_volume_id), origin.integer("lsn", 1, MAX_LSN)


def _entries(f: Fields, raws: list[object], page_count: int) -> list[Entry]:
    """A segment's index, checked a column at a time (an import's record holds a row per
    page of the database: this is 3-4x faster than entry by entry); on a failure, again
    by ``_entry``, which says which value is wrong."""
    rows = [r for r in raws if type(r) is list and len(r) == 4]
    if len(rows) == len(raws):
        bounds = ((0, page_count - 1), (0, MAX_OFFSET), (1, MAX_OFFSET), (0, MAX_CRC))
        if all(_ints_within(col, low, high) for col, (low, high) in zip(zip(*rows), bounds)):
            return list(map(Entry._make, rows))
    return [_entry(f, e, page_count) for e in raws]


def _ints_within(values: tuple[object, ...], low: int, high: int) -> bool:
    # Exact type: bool is an int subclass, and msgpack turns true into True.
    ints = [v for v in values if type(v) is int]
    return len(ints) == len(values) and low <= min(ints) and max(ints) <= high


def _entry(f: Fields, raw: object, page_count: int) -> Entry:
    if not isinstance(raw, list) or len(raw) != 4:
        raise f.bad("index", "holds an entry that is not 4 integers")

    def bad(why: str) -> CorruptData:
        return f.bad("index", f"holds a value that {why}")

    page, offset, length, crc = raw
    return Entry(
        check_int(page, 0, page_count - 1, bad),
        check_int(offset, 0, MAX_OFFSET, bad),
        check_int(length, 1, MAX_OFFSET, bad),
        check_int(crc, 0, MAX_CRC, bad),
    )
