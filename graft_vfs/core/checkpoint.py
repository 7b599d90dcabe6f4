"""Checkpoints: a volume's whole page -> segment map at one LSN, so bootstrap is O(1).

A server starting cold reads the latest checkpoint and only the log records after
it, whatever the length of the history. ``volumes/{vid}/checkpoints/{lsn:020d}`` is a
zstd-compressed msgpack map in the checksummed envelope (``core.envelope``), with the
map stored column-wise (page, version LSN, segment, offset, length, crc). Format CKP4
packs each column as little-endian integers (``core.commit.pack_column``), so decoding
is a few bulk operations and no Python object per page: the map stays columns
(``PageMap``) and a page's entry is made when it is looked up. CKP3 (msgpack lists of
integers) is decoded still. Every column is type- and range-checked on decode: a
checkpoint whose map was edited, even with every page's crc still valid, is refused.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TypeGuard

from pyroaring import BitMap, BitMap64

from graft_vfs.core.commit import (
    MAX_CRC,
    MAX_OFFSET,
    U32,
    U64,
    PageEntries,
    pack_column,
    packed_column,
    packed_entries,
)
from graft_vfs.core.envelope import Fields, Packable, pack, unpack
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_segment_id, validate_volume_id
from graft_vfs.core.segment import Entry

# CKP1 was the unchecksummed zstd msgpack checkpoint; CKP2 held frame crcs of segment
# format 1 (not bound to their page); CKP3 held msgpack lists (``LIST_CHECKPOINT_KIND``).
CHECKPOINT_KIND = b"CKP4"
LIST_CHECKPOINT_KIND = b"CKP3"


@dataclass(frozen=True)
class Located:
    """Where the version of a page that a snapshot sees lives."""

    version: int  # the LSN that wrote it
    sid: str
    entry: Entry


class PageMap:
    """A page -> ``Located`` map as columns, pages strictly ascending (a checkpoint's,
    and a loaded volume's base): ``locate`` makes the one entry asked for."""

    __slots__ = ("entries", "versions", "segments", "sids")

    def __init__(
        self, entries: PageEntries, versions: array[int], segments: array[int], sids: list[str]
    ) -> None:
        assert len(entries) == len(versions) == len(segments)
        self.entries = entries
        self.versions = versions  # the LSN that wrote each page
        self.segments = segments  # each page's segment, an index into ``sids``
        self.sids = sids

    @classmethod
    def of(cls, pages: dict[int, Located]) -> PageMap:
        """The columns of a map held as a dict."""
        order = sorted(pages)
        sids: dict[str, int] = {}
        rows = [pages[p] for p in order]
        return cls(
            PageEntries.of(loc.entry for loc in rows),
            array(U64, [loc.version for loc in rows]),
            array(U32, [sids.setdefault(loc.sid, len(sids)) for loc in rows]),
            list(sids),
        )

    @classmethod
    def empty(cls) -> PageMap:
        return cls(PageEntries.of(()), array(U64), array(U32), [])

    def __len__(self) -> int:
        return len(self.versions)

    @property
    def bitmap(self) -> BitMap:
        """The pages the map holds (do not change it: it is the map's own)."""
        return self.entries.bitmap

    def locate(self, page: int) -> Located | None:
        i = self.entries.row(page)
        if i is None:
            return None
        e = self.entries
        entry = Entry(page, e.offsets[i], e.lengths[i], e.crcs[i])
        return Located(self.versions[i], self.sids[self.segments[i]], entry)

    def pages_in(self, sid: str) -> BitMap:
        """The pages the map places in segment ``sid``."""
        if sid not in self.sids:
            return BitMap()
        index = self.sids.index(sid)
        return BitMap(p for p, s in zip(self.entries.pages, self.segments) if s == index)

    def to_dict(self) -> dict[int, Located]:
        sids = self.sids
        return {
            e.page: Located(version, sids[s], e)
            for e, version, s in zip(self.entries.entries(), self.versions, self.segments)
        }

    def newer_than(self, lsn: int) -> BitMap:
        """The pages whose version is after ``lsn``."""
        return BitMap(p for p, v in zip(self.entries.pages, self.versions) if v > lsn)

    def segment_ids(self) -> set[str]:
        """The segments the map points into."""
        return {self.sids[s] for s in set(self.segments)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageMap):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class Checkpoint:
    """The state of a volume at ``lsn``: its page count and where every page lives.

    ``pages`` (page -> Located) is made from the columns when first asked for and from
    then on is the map (compaction edits it); ``table`` is the map as columns.
    """

    def __init__(
        self,
        vid: str,
        volume_id: bytes,
        lsn: int,
        page_count: int,
        timestamp: float,
        pages: dict[int, Located] | None = None,
        *,
        table: PageMap | None = None,
    ) -> None:
        self.vid = vid
        self.volume_id = volume_id
        self.lsn = lsn
        self.page_count = page_count
        self.timestamp = timestamp
        if pages is None and table is None:
            pages = {}
        self._pages = pages
        self._table = table if pages is None else None

    @property
    def pages(self) -> dict[int, Located]:
        if self._pages is None:
            assert self._table is not None
            self._pages, self._table = self._table.to_dict(), None
        return self._pages

    @property
    def table(self) -> PageMap:
        return self._table if self._table is not None else PageMap.of(self.pages)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Checkpoint):
            return NotImplemented
        mine = (self.vid, self.volume_id, self.lsn, self.page_count, self.timestamp)
        theirs = (other.vid, other.volume_id, other.lsn, other.page_count, other.timestamp)
        return mine == theirs and self.table == other.table

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Checkpoint({self.vid!r}, lsn={self.lsn}, {len(self.table)} pages)"

    def encode(self) -> bytes:
        table = self.table
        e = table.entries
        fields: dict[str, Packable] = {
            "vid": self.vid,
            "volume_id": self.volume_id,
            "lsn": self.lsn,
            "page_count": self.page_count,
            "time": self.timestamp,
            "sids": table.sids,
            "pages": pack_column(e.pages),
            "versions": pack_column(table.versions),
            "segments": pack_column(table.segments),
            "offsets": pack_column(e.offsets),
            "lengths": pack_column(e.lengths),
            "crcs": pack_column(e.crcs),
        }
        return pack(CHECKPOINT_KIND, fields, compress=True)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """The checkpoint in ``data`` (CKP4, or CKP3 as written before); CorruptData
        unless every field and every column checks out."""
        lists = data[4:8] in (LIST_CHECKPOINT_KIND, b"CKP2")  # CKP2: refused, with the fix
        kind = LIST_CHECKPOINT_KIND if lists else CHECKPOINT_KIND
        f = unpack(kind, data, "checkpoint", compressed=True)
        lsn = f.integer("lsn", 0, MAX_LSN)
        page_count = f.integer("page_count", 0, MAX_PAGES - 1)
        sids: list[str] = []
        for sid in f.sequence("sids"):
            try:
                sids.append(validate_segment_id(sid))
            except ValueError as exc:
                raise f.bad("sids", str(exc)) from None
        table = (
            _listed_map(f, lsn, page_count, sids)
            if lists
            else _packed_map(f, lsn, page_count, sids)
        )
        return cls(
            f.text("vid", validate_volume_id),
            f.blob("volume_id", IDENTITY_SIZE),
            lsn,
            page_count,
            f.number("time"),
            table=table,
        )

    def segments(self) -> set[str]:
        if self._table is not None:
            return self._table.segment_ids()
        return {loc.sid for loc in self.pages.values()}


def _packed_map(f: Fields, lsn: int, page_count: int, sids: list[str]) -> PageMap:
    """A CKP4 map, every column checked in bulk (on its bytes, or in a bitmap)."""
    entries = packed_entries(f, page_count)
    n = len(entries)
    table = PageMap(
        entries,
        packed_column(f, "versions", U64, n),
        packed_column(f, "segments", U32, n),
        sids,
    )
    if not n:
        return table
    versions = BitMap64(table.versions)
    if versions.min() < 1 or versions.max() > lsn:
        raise f.bad("versions", f"has a version outside [1, {lsn}]")
    if BitMap(table.segments).max() >= len(sids):
        raise f.bad("segments", f"has a segment outside [0, {len(sids) - 1}]")
    return table


def _listed_map(f: Fields, lsn: int, page_count: int, sids: list[str]) -> PageMap:
    """A CKP3 map (msgpack lists of integers), checked a column at a time."""
    cols = f.sequence("cols")
    if len(cols) != 6 or not _all_lists(cols):
        raise f.bad("cols", "is not 6 lists")
    if len({len(c) for c in cols}) != 1:
        raise f.bad("cols", "has columns of different lengths")
    columns: list[list[int]] = []
    for col, (name, low, high) in zip(
        cols,
        (
            ("page", 0, page_count - 1),
            ("version", 1, lsn),
            ("segment", 0, len(sids) - 1),
            ("offset", 0, MAX_OFFSET),
            ("length", 1, MAX_OFFSET),
            ("crc", 0, MAX_CRC),
        ),
    ):
        # Checked a column at a time: a checkpoint holds a row per page of the volume.
        if not _all_ints(col) or (col and (min(col) < low or max(col) > high)):
            raise f.bad("cols", f"has a {name} outside [{low}, {high}]")
        columns.append(col)
    pages, versions, indexes, offsets, lengths, crcs = columns
    if any(a >= b for a, b in zip(pages, pages[1:])):
        raise CorruptData("checkpoint: its pages are not strictly ascending")
    try:
        entries = PageEntries(
            array(U32, pages), array(U64, offsets), array(U32, lengths), array(U32, crcs)
        )
    except OverflowError:
        raise f.bad("cols", "has a length of 4 GiB or more") from None
    return PageMap(entries, array(U64, versions), array(U32, indexes), sids)


def _all_lists(values: list[object]) -> TypeGuard[list[list[object]]]:
    return all(isinstance(v, list) for v in values)


def _all_ints(values: list[object]) -> TypeGuard[list[int]]:
    # Exact type: msgpack turns true into True, and bool is an int subclass.
    return all(type(v) is int for v in values)
