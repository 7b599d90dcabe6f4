"""A volume's history: its log (LSN, time, pages and bytes changed) and the LSN at a time.

Both read log records only, never segments: a commit's record lists the pages it wrote
and the length of each frame. The commits after the loaded checkpoint come from the
index in memory; older ones cost one small GET each, so a page of the log is bounded by
``MAX_LOG_ENTRIES`` and the LSN at a time is a binary search (about log2(LSNs) GETs).
Records below the GC floor are gone: asking for them is ``snapshot_expired``.
"""

from __future__ import annotations

from typing import NamedTuple

from graft_server.index import Index, VolumeLog, read_record
from graft_vfs.core.errors import CorruptData, SnapshotExpired, SnapshotNotFound

MAX_LOG_ENTRIES = 1000  # entries one log request may ask for


class Commit(NamedTuple):
    """What ``graft log`` shows of one commit."""

    lsn: int
    time: float  # seconds since the epoch, the committing server's clock
    page_count: int  # the volume's size after the commit, in pages
    pages: int  # pages the commit wrote
    bytes: int  # compressed bytes of those pages
    fork_of: tuple[str, int] | None = None  # a fork's LSN 1: the volume and LSN it forked


class History:
    def __init__(self, index: Index) -> None:
        self.index = index

    def log(self, vid: str, before: int | None, limit: int) -> list[Commit]:
        """Up to ``limit`` commits, newest first, below LSN ``before`` (None: from the latest).

        Stops at the oldest retained commit (the GC floor), without error.
        """
        vol = self.index.volume(vid)
        with vol.lock:
            latest = self.index.latest(vol)
            floor = max(self.index.floor(vol), 1)
        top = latest if before is None else min(before - 1, latest)
        return [self._commit(vol, lsn) for lsn in range(top, max(floor, top - limit + 1) - 1, -1)]

    def lsn_at(self, vid: str, when: float) -> Commit:
        """The latest commit made at or before ``when`` (commit times never go backwards).

        SnapshotExpired if ``when`` is before the oldest retained commit and GC removed
        older ones; SnapshotNotFound if it is before the volume's first commit.
        """
        vol = self.index.volume(vid)
        with vol.lock:
            latest = self.index.latest(vol)
            floor = max(self.index.floor(vol), 1)
        oldest = self._commit(vol, floor)
        if when < oldest.time:
            if floor > 1:
                raise SnapshotExpired(
                    f"no retained snapshot of {vid!r} at or before that time: its history "
                    f"starts at LSN {floor} ({oldest.time:.3f}); pick a later time"
                )
            raise SnapshotNotFound(f"volume {vid!r} had no commit at or before that time")
        lo, hi = floor, latest  # invariant: time(lo) <= when
        found = oldest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            commit = self._commit(vol, mid)
            if commit.time <= when:
                lo, found = mid, commit
            else:
                hi = mid - 1
        return found if found.lsn == lo else self._commit(vol, lo)

    def _commit(self, vol: VolumeLog, lsn: int) -> Commit:
        with vol.lock:
            # (LSN 1 may be a fork's, which only its record says: read it.)
            if vol.base < lsn <= vol.latest and lsn > 1:
                logged = vol.commit_at(lsn)
                sizes = [entry.length for _, entry in logged.pages.values()]
                return Commit(lsn, logged.timestamp, logged.page_count, len(sizes), sum(sizes))
        record = read_record(self.index.store, vol.vid, lsn)
        if record is None:
            raise SnapshotExpired(
                f"LSN {lsn} of {vol.vid!r} is older than its retained history; "
                "GC removed it while it was read"
            )
        if record.lsn != lsn:
            raise CorruptData(f"log record {lsn} of {vol.vid!r} says it is LSN {record.lsn}")
        entries = [e for seg in record.segments for e in seg.entries]
        size = sum(e.length for e in entries)
        if record.origin is not None:  # a fork wrote no page: it names the source's
            return Commit(lsn, record.timestamp, record.page_count, 0, 0, record.origin)
        return Commit(lsn, record.timestamp, record.page_count, len(entries), size)
