"""Zero-copy forks: a new volume whose history starts at another volume's snapshot.

A fork writes one object, the new volume's log record for LSN 1, created with the same
create-only write as any commit. Its segments are the source snapshot's page map: the
source's own segments and frames, named, never copied. So the objects written do not
grow with the volume, and a reader of the fork fetches the very frames a reader of the
source would. The record names its origin (``graft log`` shows it). GC keeps a segment
while any volume's retained records or checkpoints name it, so the source may move on,
be collected or be deleted without breaking the fork.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from typing import NamedTuple

from graft_server.index import Index, read_record
from graft_server.keys import log_key
from graft_vfs.core.commit import HASH_SIZE, CommitRecord, SegmentRef
from graft_vfs.core.errors import CommitConflict, InvalidRequest
from graft_vfs.core.ids import new_identity, validate_volume_id
from graft_vfs.core.segment import Entry


class Forked(NamedTuple):
    vid: str
    lsn: int  # always 1: the fork's first LSN
    source: str
    source_lsn: int
    page_count: int


def fork_hash(source: str, source_id: bytes, lsn: int, vid: str) -> bytes:
    """The "content hash" of a fork's record: a retry of the same fork is recognised."""
    text = f"graft fork\0{source}\0{source_id.hex()}\0{lsn}\0{vid}".encode()
    return hashlib.sha256(text).digest()[:HASH_SIZE]


class Forks:
    def __init__(self, index: Index) -> None:
        self.index = index

    def fork(self, source: str, vid: str, lsn: int | None = None) -> Forked:
        """Create ``vid`` as a fork of ``source`` at ``lsn`` (default: its latest).

        CommitConflict if ``vid`` exists (unless it is this very fork, retried);
        SnapshotExpired / SnapshotNotFound for an LSN ``source`` does not have.
        """
        vid, source = validate_volume_id(vid), validate_volume_id(source)
        if vid == source:
            raise InvalidRequest(f"cannot fork {source!r} onto itself: name another volume")
        src = self.index.volume(source)
        with src.lock:
            latest = self.index.latest(src)
            lsn = latest if lsn is None else lsn
            self.index.ensure_lsn(src, lsn)
            self.index.check_retained(src, lsn)
            view = src if lsn >= src.base else self.index.history(src, lsn)
            source_id = src.volume_id
            page_count = view.page_count_at(lsn)
            located = [(p, view.locate(p, lsn)) for p in view.versions if p < page_count]
        assert source_id is not None  # latest >= 1: the source has commits
        by_segment: dict[str, list[Entry]] = defaultdict(list)
        for page, where in sorted(located):
            if where is not None:
                by_segment[where.sid].append(where.entry)
        digest = fork_hash(source, source_id, lsn, vid)
        record = CommitRecord(
            vid,
            new_identity(),
            1,
            page_count,
            digest,
            time.time(),
            [SegmentRef(sid, entries) for sid, entries in by_segment.items()],
            origin=(source, lsn),
        )
        won = self.index.store.put_if_absent(log_key(vid, 1), record.encode())
        target = self.index.volume(vid)
        with target.lock:
            # A record 1 GC deleted (below a floor) leaves a hole the write could win.
            stray = won and self.index.floor(target, fresh=True) > 1
        if not won or stray:
            landed = None if stray else read_record(self.index.store, vid, 1)
            if landed is None or landed.hash != digest:
                self.index.unload(target)
                with target.lock:
                    latest = self.index.latest(target)
                raise CommitConflict(
                    f"volume {vid!r} already exists (LSN {latest}): fork into a new name",
                    latest_lsn=latest,
                )
        self.index.unload(target)
        return Forked(vid, 1, source, lsn, page_count)
