"""Volumes: each volume's commit log and page index, cached from the object store.

The store is the only truth. A volume's log is ``volumes/{vid}/log/{lsn:020d}``, one
``CommitRecord`` per LSN, each created with a create-only write: whoever creates
LSN n wins, so any number of server processes can share one store. This process
keeps a cache of a prefix of each log (records are immutable, so a cached record
is never stale) and, before it answers "what is the latest", probes the store for
the next LSN until it is missing.

The page index maps each page to the sorted LSNs that wrote it and each LSN to
where its pages live, so reading page p as of LSN L is one bisect. That is correct
across truncations because a commit that grows a volume must write every new page:
a page cut off and later grown back always has a version after the regrowth.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from pyroaring import BitMap

from graft_vfs.core.commit import CommitRecord, SegmentRef
from graft_vfs.core.graft import MAX_PAGES, MAX_PAGES_PER_READ
from graft_vfs.core.ids import validate_segment_id, validate_volume_id
from graft_vfs.core.segment import Entry
from graft_vfs.errors import (
    CommitConflict,
    CorruptData,
    InvalidRequest,
    SnapshotNotFound,
    VolumeNotFound,
)
from graft_vfs.faults import crash_point
from server.objstore import ObjectStore
from server.segments import fetch_frames, put_segment, read_segment_index, verify_segment

MAX_LSN = (1 << 63) - 1  # LSNs travel as msgpack ints and print in 20 digits
HASH_SIZE = 32  # sha256, see graft_vfs.core.commit.commit_hash


class Snapshot(NamedTuple):
    """A volume's latest state: its LSN and page count."""

    vid: str
    lsn: int
    page_count: int


class Pull(NamedTuple):
    """The answer to a pull: the latest LSN, its page count, and the pages changed since."""

    lsn: int
    page_count: int
    graft: BitMap


class PageFrame(NamedTuple):
    """One page as of some LSN: the commit that wrote it and its compressed frame.

    A page that was never written has version 0, crc 0 and an empty frame (all zeros).
    """

    page: int
    version_lsn: int
    crc: int
    frame: bytes


class LogEntry(NamedTuple):
    """What a log record says about its commit, enough to tell whether a push landed."""

    lsn: int
    page_count: int
    hash: bytes


def log_prefix(vid: str) -> str:
    return f"volumes/{vid}/log/"


def log_key(vid: str, lsn: int) -> str:
    return f"volumes/{vid}/log/{lsn:020d}"


def _describe(value: object) -> str:
    # Never echo a client's value whole: it may be megabytes of binary.
    return str(value) if type(value) is int else f"a {type(value).__name__}"


def _check_int(value: object, name: str, maximum: int) -> int:
    # bool is an int subclass, and msgpack turns true into True: refuse it explicitly.
    if type(value) is not int or not 0 <= value <= maximum:
        raise InvalidRequest(f"{name} must be an integer in [0, {maximum}], got {_describe(value)}")
    return value


def _verify_inline(segment: bytes | None) -> list[Entry]:
    """The index of a commit's inline segment, verified; empty if there is none."""
    if segment is None:
        return []
    if not isinstance(segment, bytes):
        raise InvalidRequest(f"segment must be binary, got {_describe(segment)}")
    return verify_segment(segment)


@dataclass
class _Commit:
    page_count: int
    hash: bytes
    graft: BitMap
    pages: dict[int, tuple[str, Entry]]  # page -> (sid, where its frame is)


class _Volume:
    """The cached log of one volume: always a prefix of the log in the store."""

    def __init__(self, vid: str) -> None:
        self.vid = vid
        self.lock = threading.Lock()  # guards everything below; held across store reads
        self.listed = False
        self.commits: list[_Commit] = []  # commits[lsn - 1]
        self.versions: dict[int, list[int]] = {}  # page -> LSNs that wrote it, ascending

    @property
    def latest(self) -> int:
        return len(self.commits)

    def page_count_at(self, lsn: int) -> int:
        return self.commits[lsn - 1].page_count if lsn else 0

    def apply(self, record: CommitRecord) -> None:
        """Append the record for LSN latest+1 to the cache."""
        if record.vid != self.vid or record.lsn != self.latest + 1:
            raise CorruptData(
                f"log record {self.latest + 1} of {self.vid!r} claims to be "
                f"LSN {record.lsn} of {record.vid!r}"
            )
        pages: dict[int, tuple[str, Entry]] = {}
        for seg in record.segments:
            for e in seg.entries:
                pages[e.page] = (seg.sid, e)
        for page in pages:
            self.versions.setdefault(page, []).append(record.lsn)
        self.commits.append(_Commit(record.page_count, record.hash, record.pages(), pages))


class Volumes:
    """Every volume in one object store: snapshots, pulls, reads and commits. Thread-safe."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._volumes: dict[str, _Volume] = {}
        self._lock = threading.Lock()

    def list_volumes(self) -> list[Snapshot]:
        """The latest snapshot of every volume in the store, by name."""
        vids = {key.split("/")[1] for key in self.store.list("volumes/") if "/log/" in key}
        return [self.snapshot(vid) for vid in sorted(vids)]

    def snapshot(self, vid: str) -> Snapshot:
        """The latest snapshot. Raises VolumeNotFound if the volume has no commit."""
        vol = self._volume(vid)
        with vol.lock:
            latest = self._latest(vol)
            return Snapshot(vol.vid, latest, vol.page_count_at(latest))

    def pull(self, vid: str, since: int) -> Pull:
        """The latest snapshot and the pages changed in ``(since, latest]`` that still exist."""
        since = _check_int(since, "since", MAX_LSN)
        vol = self._volume(vid)
        with vol.lock:
            latest = self._latest(vol)
            if since > latest:
                raise SnapshotNotFound(f"LSN {since} is beyond the latest LSN {latest} of {vid!r}")
            graft = BitMap()
            for commit in vol.commits[since:latest]:
                graft |= commit.graft
            page_count = vol.page_count_at(latest)
        # Pages past the current end were truncated away: nothing to fetch for them.
        graft.remove_range(page_count, MAX_PAGES)
        return Pull(latest, page_count, graft)

    def read(self, vid: str, lsn: int, pages: BitMap) -> list[PageFrame]:
        """Each page's frame as of ``lsn``, in page order.

        Raises InvalidRequest for more than MAX_PAGES_PER_READ pages or a page at or
        beyond the page count at ``lsn``; SnapshotNotFound if ``lsn`` is beyond the
        latest; CorruptData if a stored frame fails its checksum.
        """
        lsn = _check_int(lsn, "lsn", MAX_LSN)
        if len(pages) > MAX_PAGES_PER_READ:
            raise InvalidRequest(
                f"{len(pages)} pages requested, at most {MAX_PAGES_PER_READ} per read"
            )
        vol = self._volume(vid)
        located: dict[int, tuple[int, str, Entry]] = {}  # page -> (version, sid, entry)
        with vol.lock:
            self._ensure_lsn(vol, lsn)
            page_count = vol.page_count_at(lsn)
            if pages and pages.max() >= page_count:
                raise InvalidRequest(
                    f"page {pages.max()} is beyond the page count {page_count} at LSN {lsn}"
                )
            for page in pages:
                lsns = vol.versions.get(page, ())
                i = bisect_right(lsns, lsn)
                if i:
                    version = lsns[i - 1]
                    located[page] = (version, *vol.commits[version - 1].pages[page])
        # Segments are immutable, so frames are fetched without holding the lock.
        by_segment: dict[str, list[Entry]] = defaultdict(list)
        for _, sid, entry in located.values():
            by_segment[sid].append(entry)
        frames: dict[int, bytes] = {}
        for sid, entries in by_segment.items():
            frames.update(fetch_frames(self.store, sid, entries))
        result = []
        for page in pages:
            if page in located:
                version, _, entry = located[page]
                result.append(PageFrame(page, version, entry.crc, frames[page]))
            else:
                result.append(PageFrame(page, 0, 0, b""))
        return result

    def log_entry(self, vid: str, lsn: int) -> LogEntry:
        """The record of commit ``lsn``: lets a client that crashed mid-push check it landed."""
        lsn = _check_int(lsn, "lsn", MAX_LSN)
        vol = self._volume(vid)
        with vol.lock:
            self._ensure_lsn(vol, lsn)
            if lsn == 0:
                raise SnapshotNotFound("LSN 0 is the empty volume: it has no log record")
            commit = vol.commits[lsn - 1]
            return LogEntry(lsn, commit.page_count, commit.hash)

    def commit(
        self,
        vid: str,
        base: int,
        page_count: int,
        hash: bytes,
        segment: bytes | None = None,
        sids: list[str] | None = None,
    ) -> int:
        """Commit pages on top of LSN ``base``; return the new LSN, ``base + 1``.

        ``segment`` carries pages inline; ``sids`` names segments uploaded before.
        A retry of a commit that already landed (same ``hash`` at ``base + 1``)
        returns ``base + 1`` again. Raises CommitConflict (with ``latest_lsn``) if
        ``base`` is not the latest, InvalidRequest for a malformed commit.
        """
        vid = validate_volume_id(vid)
        base = _check_int(base, "base", MAX_LSN - 1)
        page_count = _check_int(page_count, "page_count", MAX_PAGES - 1)
        if not isinstance(hash, bytes) or len(hash) != HASH_SIZE:
            raise InvalidRequest(f"hash must be {HASH_SIZE} bytes, got {_describe(hash)}")
        inline = _verify_inline(segment)
        uploaded = self._uploaded_segments(sids)
        changed = BitMap()
        for entries in [inline, *(ref.entries for ref in uploaded)]:
            seg_pages = BitMap(e.page for e in entries)
            if changed.intersection_cardinality(seg_pages):
                raise InvalidRequest(f"page {(changed & seg_pages).min()} is in two segments")
            changed |= seg_pages
        if changed and changed.max() >= page_count:
            raise InvalidRequest(f"page {changed.max()} is beyond the page count {page_count}")

        vol = self._volume(vid)
        with vol.lock:
            self._refresh(vol)
            if base != vol.latest:
                return self._landed_or_conflict(vol, base, hash)
            previous = vol.page_count_at(base)
            if page_count > previous and not changed.contains_range(previous, page_count):
                raise InvalidRequest(
                    f"commit grows the volume from {previous} to {page_count} pages "
                    "but does not write every new page"
                )

        # The protocol's steps 2 and 3, without the lock: the create-only write
        # below decides the race, in this process as across processes.
        refs = list(uploaded)
        if segment is not None and inline:  # a truncation-only commit stores no segment
            refs.insert(0, SegmentRef(put_segment(self.store, segment), inline))
        crash_point("server.commit.after_segment")
        record = CommitRecord(vid, base + 1, page_count, hash, time.time(), refs)
        won = self.store.put_if_absent(log_key(vid, base + 1), record.encode())
        crash_point("server.commit.after_log")

        with vol.lock:
            if won and vol.latest == base:
                vol.apply(record)
                return base + 1
            # Lost the race (or someone already cached ours): the record at
            # base+1 decides between "your retry landed" and "conflict". An
            # inline segment written above is now an orphan, left for GC.
            self._refresh(vol)
            return self._landed_or_conflict(vol, base, hash)

    def _uploaded_segments(self, sids: list[str] | None) -> list[SegmentRef]:
        """The uploaded segments a commit names, with their indexes read from the store."""
        if sids is None:
            return []
        if not isinstance(sids, list):
            raise InvalidRequest(f"segments must be a list of ids, got {_describe(sids)}")
        if len(set(map(validate_segment_id, sids))) != len(sids):
            raise InvalidRequest("a segment is named twice")
        refs = []
        for sid in sids:
            entries = read_segment_index(self.store, sid)
            if entries is None:
                raise InvalidRequest(f"segment {sid} was never uploaded")
            refs.append(SegmentRef(sid, entries))
        return refs

    def _volume(self, vid: str) -> _Volume:
        vid = validate_volume_id(vid)
        with self._lock:
            vol = self._volumes.get(vid)
            if vol is None:
                vol = self._volumes[vid] = _Volume(vid)
            return vol

    def _refresh(self, vol: _Volume) -> None:
        """Bring the cache up to the store's latest record. Caller holds ``vol.lock``."""
        if not vol.listed:
            keys = self.store.list(log_prefix(vol.vid))
            for lsn, key in enumerate(keys, start=1):
                if key != log_key(vol.vid, lsn):
                    raise CorruptData(f"log of {vol.vid!r} has a gap or stray key at {key!r}")
            # Resumes where an earlier, failed load stopped.
            for lsn in range(vol.latest + 1, len(keys) + 1):
                record = self._get_record(vol.vid, lsn)
                if record is None:
                    raise CorruptData(f"log record {lsn} of {vol.vid!r} vanished after listing")
                vol.apply(record)
            vol.listed = True
        # Other processes may have committed since the listing or the last probe.
        while (record := self._get_record(vol.vid, vol.latest + 1)) is not None:
            vol.apply(record)

    def _latest(self, vol: _Volume) -> int:
        self._refresh(vol)
        if not vol.latest:
            raise VolumeNotFound(f"volume {vol.vid!r} has no commits")
        return vol.latest

    def _ensure_lsn(self, vol: _Volume, lsn: int) -> None:
        """Make ``lsn`` cached, or raise. Past LSNs need no store access: records are immutable."""
        if not vol.listed or lsn > vol.latest:
            self._refresh(vol)
        if not vol.latest:
            raise VolumeNotFound(f"volume {vol.vid!r} has no commits")
        if lsn > vol.latest:
            raise SnapshotNotFound(
                f"LSN {lsn} is beyond the latest LSN {vol.latest} of {vol.vid!r}"
            )

    def _get_record(self, vid: str, lsn: int) -> CommitRecord | None:
        data = self.store.get(log_key(vid, lsn))
        return None if data is None else CommitRecord.decode(data)

    def _landed_or_conflict(self, vol: _Volume, base: int, digest: bytes) -> int:
        """For a commit on a stale ``base``: its earlier attempt landed, or a conflict."""
        if base < vol.latest and vol.commits[base].hash == digest:
            return base + 1
        if not vol.latest:
            raise VolumeNotFound(f"volume {vol.vid!r} has no commits, so no LSN {base}")
        raise CommitConflict(
            f"commit is based on LSN {base} but the latest LSN of {vol.vid!r} is {vol.latest}",
            latest_lsn=vol.latest,
        )
