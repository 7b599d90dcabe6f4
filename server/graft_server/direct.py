"""Direct reads: page locations and presigned URLs, so clients GET frames from S3 themselves.

``POST /v1/volumes/{vid}/locate`` answers, for the pages asked (a graft: often a whole
range, which encodes in a few bytes), where each page as of an LSN lives: the segment,
the byte offset and length of its frame, its crc and the LSN that wrote it; and, per
segment, a presigned GET URL (SigV4) that expires after ``expiry`` seconds. The server
reads no segment to answer (the page map is in memory, or one checkpoint away) and
signing costs no store request, so a cold server costs clients nothing per page read.

What a URL allows: a GET of that one immutable segment object (any byte range), until
it expires; not another key, not another method. A segment holds the pages one commit
(or one compaction of one volume) wrote, so a URL handed to a token that may read the
volume gives no more than that token can already read through ``/read``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyroaring import BitMap

from graft_server.limits import DEFAULT_DIRECT_EXPIRY, MAX_DIRECT_EXPIRY
from graft_server.reads import Reads
from graft_server.segments import segment_key
from graft_vfs.core.identity import Identity

NEVER_WRITTEN = -1  # the segment column of a page no commit wrote (all zeros)


class DirectReads:
    """Answers locate requests with URLs signed by ``sign(key, seconds)``."""

    def __init__(
        self, sign: Callable[[str, int], str], expiry: int = DEFAULT_DIRECT_EXPIRY
    ) -> None:
        if not 1 <= expiry <= MAX_DIRECT_EXPIRY:
            raise ValueError(f"direct-read URL expiry must be 1 to {MAX_DIRECT_EXPIRY} seconds")
        self.sign = sign
        self.expiry = expiry

    def locate(
        self, reads: Reads, vid: str, lsn: int, pages: BitMap, expected: Identity | None
    ) -> dict[str, Any]:
        """The answer body: ``pages`` (a graft of the pages located, in the order of the
        columns), ``cols`` (segment index or -1, version, offset, length, crc: one list
        each), ``segments`` (``[sid, url]`` by segment index), ``expires_in`` seconds."""
        page_count, located = reads.locate(vid, lsn, pages, expected)
        sids: dict[str, int] = {}
        cols: list[list[int]] = [[], [], [], [], []]
        for _, loc in located:
            if loc is None:
                row = (NEVER_WRITTEN, 0, 0, 0, 0)
            else:
                e = loc.entry
                row = (sids.setdefault(loc.sid, len(sids)), loc.version, e.offset, e.length, e.crc)
            for col, value in zip(cols, row):
                col.append(value)
        return {
            "lsn": lsn,
            "page_count": page_count,
            "expires_in": self.expiry,
            "pages": BitMap(page for page, _ in located).serialize(),
            "cols": cols,
            "segments": [[sid, self.sign(segment_key(sid), self.expiry)] for sid in sids],
        }
