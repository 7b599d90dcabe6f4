"""Commit records (one per LSN in a volume's log) and the commit content hash."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
from pyroaring import BitMap

from graft_vfs.core.graft import decode_graft, encode_graft
from graft_vfs.core.segment import Entry
from graft_vfs.errors import CorruptData

RECORD_VERSION = 1


def commit_hash(
    vid: str, base_lsn: int, page_count: int, pages: Iterable[tuple[int, bytes]]
) -> bytes:
    """Content hash that identifies a commit, so a retried push is never applied twice.

    Computed over the uncompressed pages in page order, so it does not depend on the
    compressor's version or settings.
    """
    h = hashlib.sha256()
    h.update(b"graft-commit-v1\0" + vid.encode() + b"\0")
    h.update(struct.pack(">QQ", base_lsn, page_count))
    for page, data in sorted(pages):
        h.update(struct.pack(">Q", page))
        h.update(data)
    return h.digest()


@dataclass
class SegmentRef:
    """A segment a commit wrote, with the index of the pages it holds."""

    sid: str
    entries: list[Entry]

    def pages(self) -> BitMap:
        return BitMap(e.page for e in self.entries)


@dataclass
class CommitRecord:
    """``volumes/{vid}/log/{lsn:020d}``: what one LSN changed."""

    vid: str
    lsn: int
    page_count: int
    hash: bytes
    timestamp: float
    segments: list[SegmentRef] = field(default_factory=list)

    def pages(self) -> BitMap:
        bm = BitMap()
        for seg in self.segments:
            bm |= seg.pages()
        return bm

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": RECORD_VERSION,
                "vid": self.vid,
                "lsn": self.lsn,
                "page_count": self.page_count,
                "hash": self.hash,
                "time": self.timestamp,
                "pages": encode_graft(self.pages()),
                "segments": [
                    {"sid": s.sid, "index": [list(e) for e in s.entries]} for s in self.segments
                ],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> CommitRecord:
        try:
            d = msgpack.unpackb(data)
            if d.get("v") != RECORD_VERSION:
                raise CorruptData(f"unknown commit record version {d.get('v')!r}")
            rec = cls(
                vid=d["vid"],
                lsn=int(d["lsn"]),
                page_count=int(d["page_count"]),
                hash=bytes(d["hash"]),
                timestamp=float(d["time"]),
                segments=[
                    SegmentRef(s["sid"], [Entry(*map(int, e)) for e in s["index"]])
                    for s in d["segments"]
                ],
            )
            if rec.pages() != decode_graft(d["pages"]):
                raise CorruptData("commit record page bitmap does not match its segments")
            return rec
        except CorruptData:
            raise
        except Exception as exc:
            raise CorruptData("commit record is unreadable") from exc
