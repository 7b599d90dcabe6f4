"""Checkpoints: a volume's whole page -> segment map at one LSN, so bootstrap is O(1).

A server starting cold reads the latest checkpoint and only the log records after
it, whatever the length of the history. ``volumes/{vid}/checkpoints/{lsn:020d}`` is a
zstd-compressed msgpack map with the map stored column-wise (page, version LSN,
segment, offset, length, crc), which compresses well and decodes fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import zstandard

from graft_vfs.core.segment import Entry
from graft_vfs.errors import CorruptData

CHECKPOINT_VERSION = 1


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
        body = msgpack.packb(
            {
                "v": CHECKPOINT_VERSION,
                "vid": self.vid,
                "lsn": self.lsn,
                "page_count": self.page_count,
                "time": self.timestamp,
                "sids": list(sids),
                "cols": cols,
            }
        )
        return zstandard.ZstdCompressor(level=3).compress(body)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        try:
            d = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data))
            if d.get("v") != CHECKPOINT_VERSION:
                raise CorruptData(f"unknown checkpoint version {d.get('v')!r}")
            sids = d["sids"]
            pages = {
                page: Located(version, sids[s], Entry(page, off, length, crc))
                for page, version, s, off, length, crc in zip(*d["cols"])
            }
            return cls(d["vid"], int(d["lsn"]), int(d["page_count"]), float(d["time"]), pages)
        except CorruptData:
            raise
        except Exception as exc:
            raise CorruptData("checkpoint is unreadable") from exc

    def segments(self) -> set[str]:
        return {loc.sid for loc in self.pages.values()}
