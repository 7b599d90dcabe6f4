"""Garbage collection: compact small segments, bound history, delete unreachable objects.

One pass, for every volume in the store:

1. compute the retention floor, the oldest LSN that must stay readable (keep the last
   N LSNs and/or T seconds of history; with neither, history is kept whole);
2. write checkpoints at the floor and at the latest LSN in which the page versions
   of the dropped history that sit in small segments are copied into merged ones
   (so those small segments become unreachable), then record the floor in
   ``volumes/{vid}/retention`` before anything is deleted;
3. delete log records and checkpoints below the floor;
4. segments that no retained record or checkpoint names are garbage, but only once
   they have been seen unreachable for ``grace`` seconds (``gc/pending`` remembers
   when each was first seen), so a reader mid-request, or a push between uploading
   its segment and creating its log record, is never broken.

A reader that holds a snapshot below the floor gets ``snapshot_expired``, never
wrong data: the server reloads its page map when a segment is gone and checks the
floor before answering.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from graft_server.compaction import compact
from graft_server.index import Index
from graft_server.keys import checkpoint_key, checkpoint_prefix, log_prefix, lsn_of, retention_key
from graft_server.segments import SEGMENTS_PREFIX, segment_key
from graft_server.volumes import Volumes
from graft_vfs.core.checkpoint import Checkpoint, Located
from graft_vfs.core.commit import CommitRecord
from graft_vfs.core.retention import (
    Retained,
    decode_pending,
    decode_retention,
    encode_floor,
    encode_pending,
)

PENDING_KEY = "gc/pending"
DEFAULT_GRACE = 900.0  # seconds an unreachable object survives before deletion


@dataclass(frozen=True)
class Retention:
    """How much history stays readable for point-in-time reads."""

    lsns: int | None = None  # the last N LSNs
    seconds: float | None = None  # every LSN that was the latest within T seconds

    def floor(self, latest: int, timestamp_of: Callable[[int], float | None], now: float) -> int:
        """The oldest LSN to keep readable (0: keep everything).

        ``timestamp_of(lsn)`` is when ``lsn`` was committed, None if unknown (its
        record is gone): the walk back stops there, keeping everything after it.
        """
        floors = []
        if self.lsns is not None:
            floors.append(max(latest - max(self.lsns, 1) + 1, 0))
        if self.seconds is not None:
            cutoff = now - self.seconds
            lsn = latest
            # the snapshot that was current at the cutoff is the oldest one to keep
            while lsn > 0:
                committed = timestamp_of(lsn)
                if committed is None or committed <= cutoff:
                    break
                lsn -= 1
            floors.append(lsn)
        return min(floors) if floors else 0


@dataclass
class Report:
    """What one GC pass did."""

    volumes: int = 0
    checkpoints_written: int = 0
    records_deleted: int = 0
    checkpoints_deleted: int = 0
    segments_deleted: int = 0
    segments_pending: int = 0
    floors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def collect(
    volumes: Volumes,
    retention: Retention,
    *,
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
) -> Report:
    """Run one GC pass over every volume in ``volumes.store``."""
    store = volumes.store
    now = time.time() if now is None else now
    report = Report()
    # List segments before reading any log: a segment written after this listing is
    # not a candidate in this pass, whatever its commit does meanwhile.
    segments = {key.rsplit("/", 1)[1] for key in store.list(SEGMENTS_PREFIX)}
    reachable: set[str] = set()
    for vid in volumes.index.list_vids():
        reachable |= _collect_volume(volumes.index, vid, retention, now, report)
        report.volumes += 1
    data = store.get(PENDING_KEY)
    pending = decode_pending(data) if data is not None else {}
    still_pending = {}
    for sid in sorted(segments - reachable):
        first_seen = pending.get(sid, now)
        if now - first_seen >= grace:
            store.delete(segment_key(sid))
            report.segments_deleted += 1
        else:
            still_pending[sid] = first_seen
    store.put(PENDING_KEY, encode_pending(still_pending))
    report.segments_pending = len(still_pending)
    return report


def _collect_volume(
    index: Index, vid: str, retention: Retention, now: float, report: Report
) -> set[str]:
    store = index.store
    vol = index.volume(vid)
    with vol.lock:
        latest = index.latest(vol)
        base = vol.base
    floor = retention.floor(latest, lambda lsn: index.timestamp(vid, lsn), now)
    relocated: dict[tuple[int, int], Located] = {}
    if base <= floor < latest and floor > 0:
        compact(index, vid, floor, relocated, merge_upto=floor)
        report.checkpoints_written += 1
    compact(index, vid, latest, relocated, merge_upto=floor)
    report.checkpoints_written += 1
    checkpoints = [lsn_of(k) for k in store.list(checkpoint_prefix(vid))]
    kept = [c for c in checkpoints if c <= floor]
    effective = max(kept) if kept else 0
    old = store.get(retention_key(vid))
    retained = decode_retention(old) if old is not None else Retained(0)
    effective = max(effective, retained.floor)
    if effective:
        report.floors[vid] = effective
        # Readers learn the floor before anything below it disappears.
        # (keeping the deleted incarnations of the name it remembers)
        store.put(retention_key(vid), encode_floor(effective, retained.deleted))
        for key in store.list(log_prefix(vid)):
            if lsn_of(key) < effective:
                store.delete(key)
                report.records_deleted += 1
        for c in checkpoints:
            if c < effective:
                store.delete(checkpoint_key(vid, c))
                report.checkpoints_deleted += 1
    index.unload(index.volume(vid))  # serve from the compacted checkpoint from now on
    reachable: set[str] = set()
    for key in store.list(checkpoint_prefix(vid)):
        data = store.get(key)
        if data is not None:
            reachable |= Checkpoint.decode(data).segments()
    for key in store.list(log_prefix(vid)):
        data = store.get(key)
        if data is not None:
            # An unreadable record raises CorruptData: its segments must not look
            # like garbage, so the pass stops before deleting any segment.
            reachable |= {seg.sid for seg in CommitRecord.decode(data).segments}
    return reachable
