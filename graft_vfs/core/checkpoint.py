"""Checkpoints: a volume's whole page -> segment map at one LSN, so bootstrap is O(1).

A server starting cold reads the latest checkpoint and only the log records after
it, whatever the length of the history. ``volumes/{vid}/checkpoints/{lsn:020d}`` is a
zstd-compressed msgpack map in the checksummed envelope (``core.envelope``), with the
map stored column-wise (page, version LSN, segment, offset, length, crc), which
compresses well and decodes fast. Every column is type- and range-checked on decode:
a checkpoint whose map was edited, even with every page's crc still valid, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard

from graft_vfs.core.commit import MAX_CRC, MAX_OFFSET
from graft_vfs.core.envelope import Packable, pack, unpack
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_segment_id, validate_volume_id
from graft_vfs.core.segment import Entry

# CKP1 was the unchecksummed zstd msgpack checkpoint; CKP2 held frame crcs of segment
# format 1 (not bound to their page).
CHECKPOINT_KIND = b"CKP3"


@dataclass(frozen=True)
class Located:
    """Where the version of a page that a snapshot sees lives."""

    version: int  # the LSN that wrote it
    sid: str
    entry: Entry


@dataclass
class Checkpoint:
    """The state of a volume at ``lsn``: its page count and where every page lives."""

    vid: str
    volume_id: bytes
    lsn: int
    page_count: int
    timestamp: float
    pages: dict[int, Located] = field(default_factory=dict)

    def encode(self) -> bytes:
        sids: dict[str, int] = {}
        cols: list[list[int]] = [[], [], [], [], [], []]
        for page in sorted(self.pages):
            loc = self.pages[page]
            e = loc.entry
            for col, value in zip(
                cols,
                (page, loc.version, sids.setdefault(loc.sid, len(sids)), e.offset, e.length, e.crc),
            ):
                col.append(value)
        fields: dict[str, Packable] = {
            "vid": self.vid,
            "volume_id": self.volume_id,
            "lsn": self.lsn,
            "page_count": self.page_count,
            "time": self.timestamp,
            "sids": list(sids),
            "cols": cols,
        }
        return pack(CHECKPOINT_KIND, fields, compress=True)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        f = unpack(CHECKPOINT_KIND, data, "checkpoint", compressed=True)
        lsn = f.integer("lsn", 0, MAX_LSN)
        page_count = f.integer("page_count", 0, MAX_PAGES - 1)
        sids: list[str] = []
        for sid in f.sequence("sids"):
            try:
                sids.append(validate_segment_id(sid))
            except ValueError as exc:
                raise f.bad("sids", str(exc)) from None
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
        located = {
            page: Located(version, sids[s], Entry(page, off, length, crc))
            for page, version, s, off, length, crc in zip(
                pages, versions, indexes, offsets, lengths, crcs
            )
        }
        return cls(
            f.text("vid", validate_volume_id),
            f.blob("volume_id", IDENTITY_SIZE),
            lsn,
            page_count,
            f.number("time"),
            located,
        )

    def segments(self) -> set[str]:
        return {loc.sid for loc in self.pages.values()}


def _all_lists(values: list[object]) -> TypeGuard[list[list[object]]]:
    return all(isinstance(v, list) for v in values)


def _all_ints(values: list[object]) -> TypeGuard[list[int]]:
    # Exact type: msgpack turns true into True, and bool is an int subclass.
    return all(type(v) is int for v in values)
