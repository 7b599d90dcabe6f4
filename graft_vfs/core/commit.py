"""Commit records (one per LSN in a volume's log) and the commit content hash."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyroaring import BitMap

from graft_vfs.core.envelope import Fields, Packable, check_int, pack, unpack
from graft_vfs.core.errors import CorruptData, GraftError
from graft_vfs.core.graft import MAX_PAGES, decode_graft, encode_graft
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_segment_id, validate_volume_id
from graft_vfs.core.segment import Entry

# LOG1 was the unchecksummed msgpack record; LOG2 held frame crcs of segment format 1.
RECORD_KIND = b"LOG3"
HASH_SIZE = 32  # sha256
MAX_OFFSET = (1 << 63) - 1
MAX_CRC = (1 << 32) - 1


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


@dataclass
class SegmentRef:
    """A segment a commit wrote, with the index of the pages it holds."""

    sid: str
    entries: list[Entry]

    def pages(self) -> BitMap:
        return BitMap(e.page for e in self.entries)


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
                    {"sid": s.sid, "index": [list(e) for e in s.entries]} for s in self.segments
                ],
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> CommitRecord:
        f = unpack(RECORD_KIND, data, "commit record")
        page_count = f.integer("page_count", 0, MAX_PAGES - 1)
        segments = []
        seen = BitMap()
        for raw in f.sequence("segments"):
            if not isinstance(raw, dict):
                raise f.bad("segments", "holds a non-map")
            seg = Fields(raw, f.what)
            entries = _entries(seg, seg.sequence("index"), page_count)
            pages = BitMap(e.page for e in entries)
            if len(pages) != len(entries) or seen.intersection_cardinality(pages):
                raise f.bad("segments", "name a page twice")
            seen |= pages
            segments.append(SegmentRef(seg.text("sid", validate_segment_id), entries))
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
