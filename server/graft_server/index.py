"""The index: each volume's commit log and page map, cached from the object store.

The store is the only truth. A volume's log is one ``CommitRecord`` per LSN (see
``keys``), each created with a create-only write, so any number of server processes
can share one store. Checkpoints of the whole page map are written by a commit once
the log since the last checkpoint is ``commits.CHECKPOINT_EVERY`` records long, and at
each compaction, so a cold process reads the latest checkpoint and only the few records
after it, LOAD_PARALLEL at a time (each verified as it is decoded): loading costs the
same whatever the length of the history. Records are immutable, so cached ones are
never stale; before it answers "what is the latest", a process probes the store for
the next LSN until it is missing.

The page map is columns, as the checkpoint and the records decode (``PageMap``,
``PageEntries``): a cold load makes no Python object per page, so its cost is the
store reads (an import's record of 32,596 pages took ~190 ms of CPU to decode into a
dict per page; as columns, ~3 ms). Reading page p as of LSN L tests the bitmaps of the
commits after the base checkpoint, newest first, then the base's (a rank in a bitmap
gives the row); commits past FOLD_AFTER are folded into a list of LSNs per page, so a
long-running process answers with one bisect. That is correct across truncations
because a commit that grows a volume must write every new page: a page cut off and
later grown back always has a version after the regrowth.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pyroaring import BitMap

from graft_server.keys import (
    STORE_KEY,
    VOLUMES_PREFIX,
    checkpoint_key,
    checkpoint_prefix,
    is_log_key,
    log_key,
    log_prefix,
    lsn_of,
    retention_key,
    vid_of,
)
from graft_server.limits import MAX_LOADED_VOLUMES
from graft_server.objstore import ObjectStore
from graft_vfs.core.checkpoint import Checkpoint, Located, PageMap
from graft_vfs.core.commit import CommitRecord, SegmentRef
from graft_vfs.core.errors import (
    CorruptData,
    GraftError,
    IdentityMismatch,
    InvalidRequest,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    VolumeNotFound,
)
from graft_vfs.core.faults import crash_point
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.identity import Identity, decode_store, encode_store
from graft_vfs.core.ids import validate_volume_id
from graft_vfs.core.retention import Retained, decode_retention
from graft_vfs.core.segment import Entry

# How long a server trusts the GC floor it read last: `graft gc` run by another
# process raises it, and reads below it must become 410 within this many seconds.
FLOOR_RECHECK = 2.0
HISTORY_VIEWS = 4  # past-LSN page maps kept for reads older than the loaded checkpoint
# Log records read at once when a volume is loaded: one after another, each costs a
# store round trip (5-15 ms on S3). Records are decoded and applied in LSN order.
LOAD_PARALLEL = 8
_load_pool = ThreadPoolExecutor(LOAD_PARALLEL, thread_name_prefix="graft-log")
# Commits after the base found by testing their bitmaps newest first (~0.1 us each);
# past this many, they are folded into a list of LSNs per page. A cold load reads fewer
# records than commits.CHECKPOINT_EVERY, so it folds nothing: no object per page.
FOLD_AFTER = 32


def read_record(store: ObjectStore, vid: str, lsn: int) -> CommitRecord | None:
    """The log record of ``lsn``; None if there is none (not yet, or dropped by GC)."""
    for attempt in range(2):  # a damaged read in transit gets one more try
        data = store.get(log_key(vid, lsn))
        try:
            return None if data is None else CommitRecord.decode(data)
        except CorruptData:
            if attempt:
                raise
    raise AssertionError("unreachable")


def read_records(
    store: ObjectStore, vid: str, first: int, last: int
) -> Iterator[tuple[int, CommitRecord | None]]:
    """``(lsn, read_record(lsn))`` for ``first..last`` in LSN order, LOAD_PARALLEL reads
    in flight at a time (a window, so memory stays bounded however long the log)."""
    for start in range(first, last + 1, 4 * LOAD_PARALLEL):
        lsns = range(start, min(start + 4 * LOAD_PARALLEL, last + 1))
        if len(lsns) == 1:
            yield lsns[0], read_record(store, vid, lsns[0])
            continue
        yield from zip(lsns, _load_pool.map(lambda n: read_record(store, vid, n), lsns))


def read_floor(store: ObjectStore, vid: str) -> int:
    """The GC floor of ``vid`` as recorded in the store (0: none yet)."""
    return read_retention(store, vid).floor


def read_retention(store: ObjectStore, vid: str) -> Retained:
    """``vid``'s GC floor and deleted incarnations as recorded in the store."""
    data = store.get(retention_key(vid))
    return decode_retention(data) if data is not None else Retained(0)


def put_checkpoint(store: ObjectStore, checkpoint: Checkpoint) -> None:
    # Any process may write the checkpoint of an LSN, and every one of them
    # describes the same snapshot, so a plain (overwriting) put is safe.
    crash_point("server.checkpoint.before_write")
    store.put(checkpoint_key(checkpoint.vid, checkpoint.lsn), checkpoint.encode())


@dataclass
class LoggedCommit:
    """What the index keeps of one commit after its base checkpoint."""

    page_count: int
    hash: bytes
    timestamp: float
    graft: BitMap
    segments: list[SegmentRef]  # where its pages' frames are, as columns

    def find(self, page: int) -> tuple[str, Entry] | None:
        """The segment and entry of ``page``; None if this commit did not write it."""
        for seg in self.segments:
            entry = seg.columns.find(page)
            if entry is not None:
                return seg.sid, entry
        return None

    @property
    def pages(self) -> dict[int, tuple[str, Entry]]:
        """page -> (sid, where its frame is), made on each call."""
        return {e.page: (seg.sid, e) for seg in self.segments for e in seg.entries}


class VolumeLog:
    """The cached log of one volume from a checkpoint (or LSN 0) to the latest record.

    ``base_map`` is the base checkpoint's page map; ``written`` maps each page to the
    ascending LSNs in (base, folded] that wrote it; commits after ``folded`` are found
    by their bitmaps. So it answers for any LSN at or after ``base``.
    """

    def __init__(self, vid: str) -> None:
        self.vid = vid
        self.lock = threading.Lock()  # guards everything below; held across store reads
        self.loaded = False
        self.floor = 0  # the GC floor as last read, at ``floor_read`` (monotonic)
        self.floor_read = -FLOOR_RECHECK
        self.reset(None)

    def reset(self, checkpoint: Checkpoint | None) -> None:
        self.base = checkpoint.lsn if checkpoint else 0
        # The newest checkpoint this process knows is in the store (read or written).
        self.checkpointed = self.base
        self.base_page_count = checkpoint.page_count if checkpoint else 0
        self.base_time = checkpoint.timestamp if checkpoint else 0.0
        # Fixed when LSN 1 is created; None only while the cache holds no commit.
        self.volume_id: bytes | None = checkpoint.volume_id if checkpoint else None
        self.base_map = checkpoint.table if checkpoint else PageMap.empty()
        self.commits: list[LoggedCommit] = []  # commits[lsn - base - 1]
        self.written: dict[int, list[int]] = {}
        self.folded = self.base

    @property
    def latest(self) -> int:
        return self.base + len(self.commits)

    def commit_at(self, lsn: int) -> LoggedCommit:
        return self.commits[lsn - self.base - 1]

    def page_count_at(self, lsn: int) -> int:
        return self.base_page_count if lsn == self.base else self.commit_at(lsn).page_count

    def timestamp_at(self, lsn: int) -> float:
        return self.base_time if lsn == self.base else self.commit_at(lsn).timestamp

    def locate(self, page: int, lsn: int) -> Located | None:
        """Where page ``page`` as of ``lsn`` (>= base) lives; None if never written."""
        version = self._version(page, lsn)
        if version is None:
            return None
        if version <= self.base:
            return self.base_map.locate(page)
        found = self.commit_at(version).find(page)
        assert found is not None, "a commit's bitmap and its segments agree (decode checks)"
        return Located(version, *found)

    def _version(self, page: int, lsn: int) -> int | None:
        """The LSN of ``page``'s version as of ``lsn`` (``base`` for the base map's);
        None if it was never written."""
        for version in range(lsn, self.folded, -1):
            if page in self.commits[version - self.base - 1].graft:
                return version
        lsns = self.written.get(page)
        if lsns:
            i = bisect_right(lsns, lsn)
            if i:
                return lsns[i - 1]
        return self.base if page in self.base_map.bitmap else None

    def located_in(self, sid: str, lsn: int) -> dict[int, Located]:
        """The pages whose version as of ``lsn`` lives in segment ``sid``, by page."""
        candidates = self.base_map.pages_in(sid)
        for version in range(self.base + 1, lsn + 1):
            for seg in self.commit_at(version).segments:
                if seg.sid == sid:
                    candidates |= seg.columns.bitmap
        found = {}
        for page in candidates:
            loc = self.locate(page, lsn)
            if loc is not None and loc.sid == sid:
                found[page] = loc
        return found

    @property
    def versions(self) -> BitMap:
        """Every page that has a version here (in the base map or a later commit)."""
        pages = BitMap(self.base_map.bitmap)
        for commit in self.commits:
            pages |= commit.graft
        return pages

    def changed_since(self, since: int) -> BitMap:
        """The pages whose latest version is after ``since`` (which may be below base)."""
        pages = self.base_map.newer_than(since) if since < self.base else BitMap()
        for lsn in range(max(since, self.base) + 1, self.latest + 1):
            pages |= self.commit_at(lsn).graft
        return pages

    def checkpoint(self, lsn: int) -> Checkpoint:
        """The page map as of ``lsn`` (>= base): commits newest first, each giving the
        pages no newer one wrote (bitmap differences), then the base map's rest."""
        count = self.page_count_at(lsn)
        pages: dict[int, Located] = {}
        taken = BitMap()
        for version in range(lsn, self.base, -1):
            commit = self.commit_at(version)
            fresh = commit.graft - taken
            fresh.remove_range(count, MAX_PAGES)
            if fresh:
                for seg in commit.segments:
                    for page in seg.columns.bitmap & fresh:
                        entry = seg.columns.find(page)
                        assert entry is not None
                        pages[page] = Located(version, seg.sid, entry)
            taken |= commit.graft
        rest = self.base_map.bitmap - taken
        rest.remove_range(count, MAX_PAGES)
        for page in rest:
            loc = self.base_map.locate(page)
            assert loc is not None
            pages[page] = loc
        assert self.volume_id is not None, "LSN 0 has no checkpoint"
        return Checkpoint(
            self.vid, self.volume_id, lsn, self.page_count_at(lsn), self.timestamp_at(lsn), pages
        )

    def apply(self, record: CommitRecord) -> None:
        """Append the record for LSN latest+1 to the cache."""
        if record.vid != self.vid or record.lsn != self.latest + 1:
            raise CorruptData(
                f"log record {self.latest + 1} of {self.vid!r} claims to be "
                f"LSN {record.lsn} of {record.vid!r}"
            )
        if self.volume_id is None:
            self.volume_id = record.volume_id
        elif record.volume_id != self.volume_id:
            # A record of another incarnation of the name: mixing them would serve a
            # page map of two databases at once.
            raise CorruptData(
                f"log record {record.lsn} of {self.vid!r} belongs to volume "
                f"{record.volume_id.hex()}, not {self.volume_id.hex()}"
            )
        self.commits.append(
            LoggedCommit(
                record.page_count, record.hash, record.timestamp, record.pages(), record.segments
            )
        )
        if self.latest - self.folded > FOLD_AFTER:
            for lsn in range(self.folded + 1, self.latest + 1):
                for page in self.commit_at(lsn).graft:
                    self.written.setdefault(page, []).append(lsn)
            self.folded = self.latest


class Index:
    """The loaded logs of the volumes in one store, and the identities and floors they obey.

    The logs of at most ``max_loaded`` volumes stay loaded (least recently used dropped
    first), and nothing stays for a name that has no volume. Thread-safe: each
    ``VolumeLog`` has its own lock, which callers of the methods taking one hold.
    """

    def __init__(self, store: ObjectStore, *, max_loaded: int = MAX_LOADED_VOLUMES) -> None:
        self.store = store
        self.max_loaded = max(1, max_loaded)
        # Least recently used first. A volume dropped here is read again from the store
        # when next asked for; a request still holding it finishes on its own copy.
        self._volumes: OrderedDict[str, VolumeLog] = OrderedDict()
        self._lock = threading.Lock()
        self._views: dict[tuple[str, int], VolumeLog] = {}  # past-LSN page maps, few
        self._store_id: bytes | None = None

    def list_vids(self) -> list[str]:
        """Every volume with a log record in the store."""
        return sorted({vid_of(key) for key in self.store.list(VOLUMES_PREFIX) if is_log_key(key)})

    def volume(self, vid: str) -> VolumeLog:
        """The log of ``vid``, loaded or not; raises InvalidVolumeId for a bad name."""
        vid = validate_volume_id(vid)
        with self._lock:
            vol = self._volumes.get(vid)
            if vol is None:
                vol = self._volumes[vid] = VolumeLog(vid)
                while len(self._volumes) > self.max_loaded:
                    self._volumes.popitem(last=False)
            else:
                self._volumes.move_to_end(vid)
            return vol

    def loaded_volumes(self) -> int:
        """How many volumes' page maps are held in memory."""
        with self._lock:
            return len(self._volumes)

    def unload(self, vol: VolumeLog) -> None:
        """Forget the cached map of ``vol``: the next request reads the latest checkpoint."""
        with vol.lock:
            vol.loaded = False
            with self._lock:
                self._views = {k: v for k, v in self._views.items() if k[0] != vol.vid}

    def refresh(self, vol: VolumeLog, *, fresh_floor: bool = True) -> None:
        """Bring the cache up to the store's latest record. Caller holds ``vol.lock``.

        When no newer record is found, the GC floor is read too (``fresh_floor``; else
        the one read within FLOOR_RECHECK seconds): see passed_by_gc.
        """
        just_loaded = not vol.loaded
        # Other processes may have committed since the listing or the last probe.
        self._apply_newer(vol, self._load(vol) if just_loaded else None)
        if just_loaded:
            return
        try:
            passed = self.passed_by_gc(vol, fresh=fresh_floor)
        except VolumeNotFound:  # the cached volume was deleted; the name may live again
            passed = True
        if passed:
            # GC deleted the records after this cache's latest (they are below its
            # floor), or the volume was deleted: the probe above cannot see past them,
            # the store's latest checkpoint and log can.
            self._apply_newer(vol, self._load(vol))

    def _apply_newer(
        self, vol: VolumeLog, probed: tuple[CommitRecord | None] | None = None
    ) -> None:
        """Apply the records after the cache's latest, up to the first missing one.
        ``probed``: the record after the latest, read already (see ``_load``)."""
        (record,) = probed if probed is not None else (self._next_record(vol),)
        while record is not None:
            if vol.volume_id is not None and record.volume_id != vol.volume_id:
                # The name was deleted and created again (a record of the new volume):
                # this cache is of the old one. Load the new one from its own log.
                (record,) = self._load(vol)
                continue
            vol.apply(record)
            record = self._next_record(vol)

    def _next_record(self, vol: VolumeLog) -> CommitRecord | None:
        return read_record(self.store, vol.vid, vol.latest + 1)

    def passed_by_gc(self, vol: VolumeLog, *, fresh: bool = False) -> bool:
        """Whether GC raised the floor above this cache's latest LSN (the floor re-read at
        most every FLOOR_RECHECK seconds, or now if ``fresh``). Caller holds ``vol.lock``."""
        return self.floor(vol, fresh=fresh) > vol.latest

    def floor(self, vol: VolumeLog, *, fresh: bool = False) -> int:
        """The GC floor, re-read at most every FLOOR_RECHECK seconds (or now if ``fresh``).

        Caller holds ``vol.lock``.
        """
        self._read_floor(vol, fresh)
        return vol.floor

    def latest(self, vol: VolumeLog) -> int:
        """The latest LSN, refreshed. Caller holds ``vol.lock``; VolumeNotFound without one."""
        self.refresh(vol)
        if not vol.latest:
            raise self._not_found(vol, f"volume {vol.vid!r} has no commits")
        return vol.latest

    def ensure_lsn(self, vol: VolumeLog, lsn: int) -> None:
        """Make ``lsn`` cached, or raise. Past LSNs need no store access: records are immutable.

        Caller holds ``vol.lock``.
        """
        if not vol.loaded or lsn > vol.latest:
            self.refresh(vol)
        if not vol.latest:
            raise self._not_found(vol, f"volume {vol.vid!r} has no commits")
        if lsn > vol.latest:
            raise SnapshotNotFound(
                f"LSN {lsn} is beyond the latest LSN {vol.latest} of {vol.vid!r}"
            )

    def checkpoint(self, vid: str, lsn: int | None = None) -> Checkpoint:
        """The page map of ``lsn`` (default: the latest) from the loaded log, unwritten."""
        vol = self.volume(vid)
        with vol.lock:
            latest = self.latest(vol)
            lsn = latest if lsn is None else lsn
            if not vol.base <= lsn <= latest:
                raise InvalidRequest(f"cannot checkpoint LSN {lsn} of {vid!r} from this cache")
            return vol.checkpoint(lsn)

    def history(self, vol: VolumeLog, lsn: int) -> VolumeLog:
        """A page map valid at ``lsn``, older than ``vol``'s base checkpoint."""
        key = (vol.vid, lsn)
        view = self._views.get(key)
        if view is not None:
            return view
        expired = SnapshotExpired(
            f"LSN {lsn} of {vol.vid!r} is older than its retained history; pull a newer snapshot"
        )
        older = [c for c in map(lsn_of, self.store.list(checkpoint_prefix(vol.vid))) if c <= lsn]
        view = VolumeLog(vol.vid)
        if older:
            data = self.store.get(checkpoint_key(vol.vid, older[-1]))
            if data is None:
                raise expired
            view.reset(Checkpoint.decode(data))
        for _, record in read_records(self.store, vol.vid, view.base + 1, lsn):
            if record is None:
                raise expired
            view.apply(record)
        view.loaded = True
        with self._lock:
            if len(self._views) >= HISTORY_VIEWS:
                self._views.pop(next(iter(self._views)))
            self._views[key] = view
        return view

    def timestamp(self, vid: str, lsn: int) -> float | None:
        """When ``lsn`` was committed; None if its record is no longer in the store."""
        vol = self.volume(vid)
        with vol.lock:
            if lsn >= vol.base and lsn <= vol.latest and (lsn > 0 or vol.base == 0):
                return vol.timestamp_at(lsn)
        record = read_record(self.store, vid, lsn)
        return record.timestamp if record is not None else None

    def check_retained(self, vol: VolumeLog, lsn: int) -> None:
        """Raise SnapshotExpired for an LSN below the GC floor. Caller holds ``vol.lock``.

        GC may run in another process; the floor it records is re-read at most every
        FLOOR_RECHECK seconds, so old LSNs turn 410 that soon after it.
        """
        self._read_floor(vol)
        if lsn < vol.floor:
            raise SnapshotExpired(
                f"LSN {lsn} of {vol.vid!r} is older than its retained history (LSN "
                f"{vol.floor} and later); pull a newer snapshot"
            )

    def _read_floor(self, vol: VolumeLog, fresh: bool = False) -> None:
        """Re-read the floor if due; VolumeNotFound if the cached volume was deleted."""
        now = time.monotonic()
        if fresh or now - vol.floor_read >= FLOOR_RECHECK:
            retained = read_retention(self.store, vol.vid)
            vol.floor = max(vol.floor, retained.floor)
            vol.floor_read = now
            if vol.volume_id is not None and vol.volume_id in retained.deleted:
                vol.loaded = False  # a new volume of that name is read from its own log
                with self._lock:
                    self._views = {k: v for k, v in self._views.items() if k[0] != vol.vid}
                raise VolumeNotFound(f"volume {vol.vid!r} was deleted")

    def _prefetch_store_id(self) -> None:
        """Read the store's identity if it has one; creating it is left to store_id (a
        load must not write, and a failed read is read again by whoever needs it)."""
        try:
            data = self.store.get(STORE_KEY)
            if data is not None and self._store_id is None:
                self._store_id = decode_store(data)
        except GraftError:
            pass

    def store_id(self) -> bytes:
        """The store's identity, created (once, whoever comes first) if it has none yet."""
        if self._store_id is None:
            data = self.store.get(STORE_KEY)
            if data is None:
                self.store.put_if_absent(STORE_KEY, encode_store())
                data = self.store.get(STORE_KEY)
                if data is None:
                    raise StorageError("the store identity object vanished after it was created")
            self._store_id = decode_store(data)
        return self._store_id

    def identity(self, vid: str) -> Identity:
        """The identity of ``vid`` and of the store. Raises VolumeNotFound without commits."""
        vol = self.volume(vid)
        with vol.lock:
            if not vol.loaded or vol.volume_id is None:
                self.latest(vol)
            assert vol.volume_id is not None
            volume_id = vol.volume_id
        return Identity(self.store_id(), volume_id)

    def check_identity(self, vol: VolumeLog, expected: Identity | None) -> None:
        """Refuse a request made for another incarnation of the volume. Caller holds the lock."""
        if expected is None or vol.volume_id is None:
            return
        actual = Identity(self.store_id(), vol.volume_id)
        if actual != expected:
            raise IdentityMismatch(
                f"volume {vol.vid!r} here is {actual}, not {expected} as the client expects: "
                "it was created again or the client was pointed at another store"
            )

    def _load(self, vol: VolumeLog) -> tuple[CommitRecord | None]:
        """Read the latest checkpoint and the log records after it. Caller holds the lock.

        Returns the record after the listed ones, read with them (the probe ``refresh``
        makes next, in a 1-tuple: None inside if there is none). The GC floor and the
        store's identity, which the first request asks for next, are read meanwhile: a
        cold server's first answer waited for 6 store round trips one after another
        before its first segment read, now for 3 (listings, then the records).
        """
        # The floor is read again for what is loaded (a name deleted and created again
        # starts over).
        vol.floor, vol.floor_read = 0, -FLOOR_RECHECK
        floor_read = time.monotonic()
        retention = _load_pool.submit(read_retention, self.store, vol.vid)
        store_id = _load_pool.submit(self._prefetch_store_id) if self._store_id is None else None
        for _ in range(3):
            checkpoints = self.store.list(checkpoint_prefix(vol.vid))
            checkpoint = None
            if checkpoints:
                data = self.store.get(checkpoints[-1])
                if data is None:
                    continue  # removed by GC after a newer one was written: list again
                checkpoint = Checkpoint.decode(data)
            vol.reset(checkpoint)
            after = log_key(vol.vid, vol.base)
            keys = self.store.list(log_prefix(vol.vid), start_after=after)
            for lsn, key in enumerate(keys, start=vol.base + 1):
                if key != log_key(vol.vid, lsn):
                    raise CorruptData(f"log of {vol.vid!r} has a gap or stray key at {key!r}")
            last = vol.base + len(keys)
            newer = None
            for lsn, record in read_records(self.store, vol.vid, vol.base + 1, last + 1):
                if lsn > last:
                    newer = record  # committed since the listing, or None
                elif record is None:
                    raise CorruptData(f"log record {lsn} of {vol.vid!r} vanished after listing")
                else:
                    vol.apply(record)
            vol.loaded = True
            if store_id is not None:
                store_id.result()
            try:
                retained = retention.result()
            except GraftError:
                pass  # read again when asked for: that read says what failed
            else:
                if vol.volume_id is None or vol.volume_id not in retained.deleted:
                    # (A deleted volume's floor is left unread: _read_floor says so.)
                    vol.floor, vol.floor_read = retained.floor, floor_read
            return (newer,)
        raise StorageError(f"the checkpoints of {vol.vid!r} kept changing while being read")

    def _not_found(self, vol: VolumeLog, message: str) -> VolumeNotFound:
        """VolumeNotFound for ``vol``, which no longer stays loaded: a name asked for
        that has no volume must leave nothing behind."""
        with self._lock:
            if self._volumes.get(vol.vid) is vol:
                del self._volumes[vol.vid]
        if read_retention(self.store, vol.vid).deleted:
            message = f"volume {vol.vid!r} was deleted"
        return VolumeNotFound(message)
