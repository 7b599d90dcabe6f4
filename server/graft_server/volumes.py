"""Volumes: each volume's commit log and page index, cached from the object store.

The store is the only truth. A volume's log is ``volumes/{vid}/log/{lsn:020d}``, one
``CommitRecord`` per LSN, each created with a create-only write: whoever creates
LSN n wins, so any number of server processes can share one store. Every
``checkpoint_every`` LSNs (and at each compaction) a checkpoint of the whole page
map is written, so a cold process reads the latest checkpoint and only the records
after it: bootstrap costs the same whatever the length of the history. Records are
immutable, so cached ones are never stale; before it answers "what is the latest",
a process probes the store for the next LSN until it is missing.

The page index maps each page to the sorted LSNs that wrote it and each LSN to
where its pages live, so reading page p as of LSN L is one bisect. That is correct
across truncations because a commit that grows a volume must write every new page:
a page cut off and later grown back always has a version after the regrowth.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from pyroaring import BitMap

from graft_server.limits import MAX_LOADED_VOLUMES
from graft_server.objstore import ObjectStore
from graft_server.segments import (
    MissingSegment,
    SegmentCache,
    fetch_frames,
    put_segment,
    read_segment_index,
    segment_key,
    verify_segment,
)
from graft_vfs.core.btree import interior_children, is_interior
from graft_vfs.core.checkpoint import Checkpoint, Located
from graft_vfs.core.commit import HASH_SIZE, CommitHasher, CommitRecord, SegmentRef
from graft_vfs.core.errors import (
    CommitConflict,
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
from graft_vfs.core.graft import MAX_PAGES, MAX_PAGES_PER_READ
from graft_vfs.core.identity import STORE_KEY, Identity, decode_store, encode_store
from graft_vfs.core.ids import (
    IDENTITY_SIZE,
    MAX_LSN,
    new_identity,
    validate_segment_id,
    validate_volume_id,
)
from graft_vfs.core.protocol import MAX_EXPAND
from graft_vfs.core.retention import decode_floor
from graft_vfs.core.segment import (
    MAX_SEGMENT_PAGES,
    Entry,
    decode_page,
    decompress_page,
    encode_frames,
)

CHECKPOINT_EVERY = 32  # bootstrap reads at most this many log records
SMALL_SEGMENT_PAGES = 256  # compaction merges segments holding fewer live pages
MERGED_SEGMENT_PAGES = MAX_SEGMENT_PAGES  # compaction writes no segment a client could not
# How long a server trusts the GC floor it read last: `graft gc` run by another
# process raises it, and reads below it must become 410 within this many seconds.
FLOOR_RECHECK = 2.0
log = logging.getLogger("graft.server")

HISTORY_VIEWS = 4  # past-LSN page maps kept for reads older than the loaded checkpoint


class Snapshot(NamedTuple):
    """A volume's latest state: its LSN and page count."""

    vid: str
    lsn: int
    page_count: int


class Unreadable(NamedTuple):
    """A volume in a listing whose state cannot be read: the error code and message."""

    vid: str
    error: str
    message: str


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


def checkpoint_prefix(vid: str) -> str:
    return f"volumes/{vid}/checkpoints/"


def checkpoint_key(vid: str, lsn: int) -> str:
    return f"volumes/{vid}/checkpoints/{lsn:020d}"


def retention_key(vid: str) -> str:
    """The GC floor (``core.retention``): LSNs below it are no longer retained."""
    return f"volumes/{vid}/retention"


def lsn_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


def _describe(value: object) -> str:
    # Never echo a client's value whole: it may be megabytes of binary.
    return str(value) if type(value) is int else f"a {type(value).__name__}"


def _check_int(value: object, name: str, maximum: int) -> int:
    # bool is an int subclass, and msgpack turns true into True: refuse it explicitly.
    if type(value) is not int or not 0 <= value <= maximum:
        raise InvalidRequest(f"{name} must be an integer in [0, {maximum}], got {_describe(value)}")
    return value


def expected_identity(store_id: object, volume_id: object) -> Identity | None:
    """The identity a client expects the volume to have (both fields, or neither)."""
    if store_id is None and volume_id is None:
        return None
    for name, value in (("store_id", store_id), ("volume_id", volume_id)):
        if not isinstance(value, bytes) or len(value) != IDENTITY_SIZE:
            raise InvalidRequest(f"{name} must be {IDENTITY_SIZE} bytes, got {_describe(value)}")
    assert isinstance(store_id, bytes) and isinstance(volume_id, bytes)
    return Identity(store_id, volume_id)


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
    timestamp: float
    graft: BitMap
    pages: dict[int, tuple[str, Entry]]  # page -> (sid, where its frame is)


class _Volume:
    """The cached log of one volume from a checkpoint (or LSN 0) to the latest record.

    ``versions`` maps each page to the ascending LSNs that wrote it, starting with the
    version the base checkpoint holds; so it answers for any LSN at or after ``base``.
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
        self.base_page_count = checkpoint.page_count if checkpoint else 0
        self.base_time = checkpoint.timestamp if checkpoint else 0.0
        # Fixed when LSN 1 is created; None only while the cache holds no commit.
        self.volume_id: bytes | None = checkpoint.volume_id if checkpoint else None
        self.base_pages: dict[int, Located] = dict(checkpoint.pages) if checkpoint else {}
        self.commits: list[_Commit] = []  # commits[lsn - base - 1]
        self.versions: dict[int, list[int]] = {
            page: [loc.version] for page, loc in self.base_pages.items()
        }

    @property
    def latest(self) -> int:
        return self.base + len(self.commits)

    def commit_at(self, lsn: int) -> _Commit:
        return self.commits[lsn - self.base - 1]

    def page_count_at(self, lsn: int) -> int:
        return self.base_page_count if lsn == self.base else self.commit_at(lsn).page_count

    def timestamp_at(self, lsn: int) -> float:
        return self.base_time if lsn == self.base else self.commit_at(lsn).timestamp

    def locate(self, page: int, lsn: int) -> Located | None:
        """Where page ``page`` as of ``lsn`` (>= base) lives; None if never written."""
        lsns = self.versions.get(page, ())
        i = bisect_right(lsns, lsn)
        if not i:
            return None
        version = lsns[i - 1]
        if version <= self.base:
            return self.base_pages[page]
        sid, entry = self.commit_at(version).pages[page]
        return Located(version, sid, entry)

    def checkpoint(self, lsn: int) -> Checkpoint:
        """The page map as of ``lsn`` (>= base)."""
        pages = {}
        for page in range(self.page_count_at(lsn)):
            loc = self.locate(page, lsn)
            if loc is not None:
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
        pages: dict[int, tuple[str, Entry]] = {}
        for seg in record.segments:
            for e in seg.entries:
                pages[e.page] = (seg.sid, e)
        for page in pages:
            self.versions.setdefault(page, []).append(record.lsn)
        self.commits.append(
            _Commit(record.page_count, record.hash, record.timestamp, record.pages(), pages)
        )


class Volumes:
    """Every volume in one object store: snapshots, pulls, reads and commits. Thread-safe.

    ``cache`` (optional) keeps recently read page frames in memory, bounded in bytes;
    the page maps of at most ``max_loaded`` volumes stay loaded (least recently used
    dropped first), and nothing stays for a name that has no volume.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        cache: SegmentCache | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        max_loaded: int = MAX_LOADED_VOLUMES,
    ) -> None:
        self.store = store
        self.cache = cache
        self.checkpoint_every = checkpoint_every
        self.max_loaded = max(1, max_loaded)
        # Least recently used first. A volume dropped here is read again from the store
        # when next asked for; a request still holding it finishes on its own copy.
        self._volumes: OrderedDict[str, _Volume] = OrderedDict()
        self._lock = threading.Lock()
        self._views: dict[tuple[str, int], _Volume] = {}  # past-LSN page maps, few
        self._store_id: bytes | None = None

    def list_vids(self) -> list[str]:
        """Every volume with a log or a checkpoint in the store."""
        return sorted({key.split("/")[1] for key in self.store.list("volumes/") if "/log/" in key})

    def list_volumes(
        self, allowed: Callable[[str], bool] | None = None
    ) -> list[Snapshot | Unreadable]:
        """The latest snapshot of every volume in the store that ``allowed`` accepts, by name.

        Volumes outside ``allowed`` are never loaded. A volume that cannot be read
        (CorruptData) is listed as Unreadable instead of failing the whole listing.
        """
        listed: list[Snapshot | Unreadable] = []
        for vid in self.list_vids():
            if allowed is not None and not allowed(vid):
                continue
            try:
                listed.append(self.snapshot(vid))
            except VolumeNotFound:
                continue  # its log went away after the listing
            except CorruptData as exc:
                listed.append(Unreadable(vid, "corrupt_data", str(exc)))
        return listed

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
            if since >= vol.base:
                graft = BitMap()
                for lsn in range(since + 1, latest + 1):
                    graft |= vol.commit_at(lsn).graft
            else:
                # Older than the loaded checkpoint: a page changed in (since, latest]
                # exactly when its latest version is newer than since.
                graft = BitMap(p for p, lsns in vol.versions.items() if lsns[-1] > since)
            page_count = vol.page_count_at(latest)
        # Pages past the current end were truncated away: nothing to fetch for them.
        graft.remove_range(page_count, MAX_PAGES)
        return Pull(latest, page_count, graft)

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
        vol = self._volume(vid)
        with vol.lock:
            if not vol.loaded or vol.volume_id is None:
                self._latest(vol)
            assert vol.volume_id is not None
            volume_id = vol.volume_id
        return Identity(self.store_id(), volume_id)

    def _check_identity(self, vol: _Volume, expected: Identity | None) -> None:
        """Refuse a request made for another incarnation of the volume. Caller holds the lock."""
        if expected is None or vol.volume_id is None:
            return
        actual = Identity(self.store_id(), vol.volume_id)
        if actual != expected:
            raise IdentityMismatch(
                f"volume {vol.vid!r} here is {actual}, not {expected} as the client expects: "
                "it was created again or the client was pointed at another store"
            )

    def _check_retained(self, vol: _Volume, lsn: int) -> None:
        """Raise SnapshotExpired for an LSN below the GC floor. Caller holds ``vol.lock``.

        GC may run in another process; the floor it records is re-read at most every
        FLOOR_RECHECK seconds, so old LSNs turn 410 that soon after it.
        """
        now = time.monotonic()
        if now - vol.floor_read >= FLOOR_RECHECK:
            vol.floor = max(vol.floor, self._floor(vol.vid))
            vol.floor_read = now
        if lsn < vol.floor:
            raise SnapshotExpired(
                f"LSN {lsn} of {vol.vid!r} is older than its retained history (LSN "
                f"{vol.floor} and later); pull a newer snapshot"
            )

    def read(
        self,
        vid: str,
        lsn: int,
        pages: BitMap,
        expand: int = 0,
        expected: Identity | None = None,
    ) -> list[PageFrame]:
        """Each page's frame as of ``lsn``, in page order.

        With ``expand``, up to that many interior B-tree pages below the requested
        interior pages follow (see ``_interior_below``).

        Raises InvalidRequest for more than MAX_PAGES_PER_READ pages or a page at or
        beyond the page count at ``lsn``; SnapshotNotFound if ``lsn`` is beyond the
        latest; SnapshotExpired if GC removed it; CorruptData if a stored frame fails
        its checksum; IdentityMismatch if the volume is not ``expected``.
        """
        lsn = _check_int(lsn, "lsn", MAX_LSN)
        if len(pages) > MAX_PAGES_PER_READ:
            raise InvalidRequest(
                f"{len(pages)} pages requested, at most {MAX_PAGES_PER_READ} per read"
            )
        expand = _check_int(expand, "expand", MAX_EXPAND)
        vol = self._volume(vid)
        try:
            return self._read(vol, lsn, pages, expand, expected)
        except MissingSegment:
            # GC may have compacted the pages into new segments (and deleted the old
            # ones after its grace period): reload the map once and retry.
            if lsn < self._floor(vid):
                raise SnapshotExpired(
                    f"LSN {lsn} of {vid!r} is older than its retained history; "
                    "pull a newer snapshot"
                ) from None
            with vol.lock:
                vol.loaded = False
                self._views = {k: v for k, v in self._views.items() if k[0] != vid}
            return self._read(vol, lsn, pages, expand, expected)

    def _read(
        self, vol: _Volume, lsn: int, pages: BitMap, expand: int, expected: Identity | None
    ) -> list[PageFrame]:
        with vol.lock:
            self._ensure_lsn(vol, lsn)
            self._check_identity(vol, expected)
            self._check_retained(vol, lsn)
            view = vol if lsn >= vol.base else self._history(vol, lsn)
        page_count = view.page_count_at(lsn)
        if pages and pages.max() >= page_count:
            raise InvalidRequest(
                f"page {pages.max()} is beyond the page count {page_count} at LSN {lsn}"
            )
        frames = self._frames(view, lsn, pages)
        result = [frames[page] for page in pages]
        if expand:
            result += self._interior_below(view, lsn, page_count, frames, expand)
        return result

    def _frames(self, view: _Volume, lsn: int, pages: Iterable[int]) -> dict[int, PageFrame]:
        """Each page's frame as of ``lsn`` (an empty frame for a page never written)."""
        located: dict[int, Located] = {}
        with view.lock:
            for page in pages:
                loc = view.locate(page, lsn)
                if loc is not None:
                    located[page] = loc
        # Segments are immutable, so frames are fetched without holding the lock.
        by_segment: dict[str, list[Entry]] = defaultdict(list)
        for loc in located.values():
            by_segment[loc.sid].append(loc.entry)
        frames: dict[int, bytes] = {}
        for sid, entries in by_segment.items():
            frames.update(fetch_frames(self.store, sid, entries, self.cache))
        result = {}
        for page in pages:
            loc = located.get(page)
            if loc is not None:
                result[page] = PageFrame(page, loc.version, loc.entry.crc, frames[page])
            else:
                result[page] = PageFrame(page, 0, 0, b"")
        return result

    def _interior_below(
        self,
        view: _Volume,
        lsn: int,
        page_count: int,
        requested: dict[int, PageFrame],
        budget: int,
    ) -> list[PageFrame]:
        """Interior B-tree pages under the requested interior pages, level by level.

        A lookup that reads a B-tree's root will read one page of every interior
        level below it; sending the levels along (up to ``budget`` pages, highest
        levels first) turns one round trip per level into one per tree. B-trees are
        balanced, so one probe per level tells whether that level is still interior.
        """
        seen = set(requested)
        level: list[int] = []
        for page, frame in requested.items():
            if frame.frame:
                level += interior_children(decompress_page(frame.frame, page), page)
        extra: list[PageFrame] = []
        while budget > 0:
            level = [p for p in dict.fromkeys(level) if p < page_count and p not in seen]
            if not level:
                break
            probe = self._frames(view, lsn, level[:1])[level[0]]
            if not probe.frame or not is_interior(decompress_page(probe.frame, level[0]), level[0]):
                break
            batch = level[:budget]
            frames = self._frames(view, lsn, batch)
            budget -= len(batch)
            seen.update(batch)
            level = []
            for page in batch:
                frame = frames[page]
                if frame.frame:
                    extra.append(frame)
                    level += interior_children(decompress_page(frame.frame, page), page)
        return extra

    def _history(self, vol: _Volume, lsn: int) -> _Volume:
        """A page map valid at ``lsn``, older than ``vol``'s base checkpoint."""
        key = (vol.vid, lsn)
        view = self._views.get(key)
        if view is not None:
            return view
        expired = SnapshotExpired(
            f"LSN {lsn} of {vol.vid!r} is older than its retained history; pull a newer snapshot"
        )
        older = [c for c in map(lsn_of, self.store.list(checkpoint_prefix(vol.vid))) if c <= lsn]
        view = _Volume(vol.vid)
        if older:
            data = self.store.get(checkpoint_key(vol.vid, older[-1]))
            if data is None:
                raise expired
            view.reset(Checkpoint.decode(data))
        for n in range(view.base + 1, lsn + 1):
            record = self._get_record(vol.vid, n)
            if record is None:
                raise expired
            view.apply(record)
        view.loaded = True
        with self._lock:
            if len(self._views) >= HISTORY_VIEWS:
                self._views.pop(next(iter(self._views)))
            self._views[key] = view
        return view

    def _floor(self, vid: str) -> int:
        data = self.store.get(retention_key(vid))
        return decode_floor(data) if data is not None else 0

    def timestamp(self, vid: str, lsn: int) -> float | None:
        """When ``lsn`` was committed; None if its record is no longer in the store."""
        vol = self._volume(vid)
        with vol.lock:
            if lsn >= vol.base and lsn <= vol.latest and (lsn > 0 or vol.base == 0):
                return vol.timestamp_at(lsn)
        record = self._get_record(vid, lsn)
        return record.timestamp if record is not None else None

    def log_entry(self, vid: str, lsn: int) -> LogEntry:
        """The record of commit ``lsn``: lets a client that crashed mid-push check it landed."""
        lsn = _check_int(lsn, "lsn", MAX_LSN)
        vol = self._volume(vid)
        with vol.lock:
            self._ensure_lsn(vol, lsn)
            if lsn == 0:
                raise SnapshotNotFound("LSN 0 is the empty volume: it has no log record")
            self._check_retained(vol, lsn)
            if lsn > vol.base:
                commit = vol.commit_at(lsn)
                return LogEntry(lsn, commit.page_count, commit.hash)
        record = self._get_record(vid, lsn)
        if record is None:
            raise SnapshotExpired(f"LSN {lsn} of {vid!r} is older than its retained history")
        return LogEntry(lsn, record.page_count, record.hash)

    def commit(
        self,
        vid: str,
        base: int,
        page_count: int,
        hash: bytes,
        segment: bytes | None = None,
        sids: list[str] | None = None,
        expected: Identity | None = None,
    ) -> int:
        """Commit pages on top of LSN ``base``; return the new LSN, ``base + 1``.

        ``segment`` carries pages inline; ``sids`` names segments uploaded before.
        A retry of a commit that already landed (same ``hash`` at ``base + 1``)
        returns ``base + 1`` again. Raises CommitConflict (with ``latest_lsn``) if
        ``base`` is not the latest, InvalidRequest for a malformed commit or a
        ``hash`` that is not the hash of its pages, IdentityMismatch if the volume is
        not ``expected``.
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
        # Before the retry check: a body claiming a landed commit's hash with other
        # pages must not be answered as that commit.
        self._verify_hash(vid, base, page_count, hash, segment, inline, uploaded)

        vol = self._volume(vid)
        with vol.lock:
            self._refresh(vol)
            self._check_identity(vol, expected)
            volume_id = vol.volume_id if base else new_identity()
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
        assert volume_id is not None  # base > 0 == latest, so the cache holds commits
        record = CommitRecord(vid, volume_id, base + 1, page_count, hash, time.time(), refs)
        won = self.store.put_if_absent(log_key(vid, base + 1), record.encode())
        crash_point("server.commit.after_log")

        checkpoint = None
        with vol.lock:
            if won and vol.latest == base:
                vol.apply(record)
                if (base + 1) % self.checkpoint_every == 0:
                    checkpoint = vol.checkpoint(base + 1)
        if won:
            if checkpoint is not None:
                try:
                    self._put_checkpoint(checkpoint)
                except GraftError as exc:  # the commit landed; a later one checkpoints
                    log.warning("checkpoint of %s at %d failed: %s", vid, base + 1, exc)
            return base + 1
        with vol.lock:
            # Lost the race (or someone already cached ours): the record at
            # base+1 decides between "your retry landed" and "conflict". An
            # inline segment written above is now an orphan, left for GC.
            self._refresh(vol)
            return self._landed_or_conflict(vol, base, hash)

    def _verify_hash(
        self,
        vid: str,
        base: int,
        page_count: int,
        digest: bytes,
        segment: bytes | None,
        inline: list[Entry],
        uploaded: list[SegmentRef],
    ) -> None:
        """Refuse a commit whose ``digest`` is not ``commit_hash`` of the pages it carries.

        Pages are decoded and hashed one at a time, segment after segment in page order,
        so the check holds one segment's bytes at a time, never the decoded commit.
        """
        parts: list[tuple[list[Entry], str | None]] = [(ref.entries, ref.sid) for ref in uploaded]
        if inline:
            parts.append((inline, None))
        parts.sort(key=lambda part: min(e.page for e in part[0]) if part[0] else -1)
        hasher = CommitHasher(vid, base, page_count)
        for entries, sid in parts:
            if sid is None:
                assert segment is not None
                data = segment
            else:
                stored = self.store.get(segment_key(sid))
                if stored is None:
                    raise InvalidRequest(f"segment {sid} was never uploaded")
                data = stored
            for e in sorted(entries, key=lambda e: e.page):
                try:
                    hasher.add(e.page, decode_page(e, data[e.offset : e.offset + e.length]))
                except ValueError:
                    raise InvalidRequest(
                        "the segments of a commit must hold ascending, non-interleaved page "
                        "ranges"
                    ) from None
        if hasher.digest() != digest:
            raise InvalidRequest(
                f"hash {digest.hex()[:16]}... is not the hash of the commit's pages "
                f"({hasher.digest().hex()[:16]}...): compute it with "
                "graft_vfs.core.commit.commit_hash over the pages sent"
            )

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
                while len(self._volumes) > self.max_loaded:
                    self._volumes.popitem(last=False)
            else:
                self._volumes.move_to_end(vid)
            return vol

    def loaded_volumes(self) -> int:
        """How many volumes' page maps are held in memory."""
        with self._lock:
            return len(self._volumes)

    def _not_found(self, vol: _Volume, message: str) -> VolumeNotFound:
        """VolumeNotFound for ``vol``, which no longer stays loaded: a name asked for
        that has no volume must leave nothing behind."""
        with self._lock:
            if self._volumes.get(vol.vid) is vol:
                del self._volumes[vol.vid]
        return VolumeNotFound(message)

    def _put_checkpoint(self, checkpoint: Checkpoint) -> None:
        # Any process may write the checkpoint of an LSN, and every one of them
        # describes the same snapshot, so a plain (overwriting) put is safe.
        self.store.put(checkpoint_key(checkpoint.vid, checkpoint.lsn), checkpoint.encode())

    def write_checkpoint(self, vid: str, lsn: int | None = None) -> Checkpoint:
        """Write the checkpoint of ``lsn`` (default: the latest) and return it."""
        vol = self._volume(vid)
        with vol.lock:
            latest = self._latest(vol)
            lsn = latest if lsn is None else lsn
            if not vol.base <= lsn <= latest:
                raise InvalidRequest(f"cannot checkpoint LSN {lsn} of {vid!r} from this cache")
            checkpoint = vol.checkpoint(lsn)
        self._put_checkpoint(checkpoint)
        return checkpoint

    def compact(
        self,
        vid: str,
        lsn: int,
        relocated: dict[tuple[int, int], Located],
        merge_upto: int,
        small_pages: int = SMALL_SEGMENT_PAGES,
    ) -> Checkpoint:
        """Write the checkpoint of ``lsn`` with page versions of small segments merged.

        Versions written at or before ``merge_upto`` (whose log records GC is about to
        drop) that live in segments holding fewer than ``small_pages`` of the
        checkpoint's pages are copied, still compressed, into new segments, so the
        old small segments become unreachable. Later versions stay where their
        retained records point. ``relocated`` maps ``(page, version)`` to a copy made
        earlier in the same GC run (never copy a version twice); updated in place.
        """
        vol = self._volume(vid)
        with vol.lock:
            self._latest(vol)
            if not vol.base <= lsn <= vol.latest:
                raise InvalidRequest(f"cannot checkpoint LSN {lsn} of {vid!r} from this cache")
            checkpoint = vol.checkpoint(lsn)
        by_sid: dict[str, list[Located]] = defaultdict(list)
        for page, loc in checkpoint.pages.items():
            copy = relocated.get((page, loc.version))
            if copy is not None:
                checkpoint.pages[page] = copy
            elif loc.version <= merge_upto:
                by_sid[loc.sid].append(loc)
        small = [sid for sid, locs in by_sid.items() if len(locs) < small_pages]
        if len(small) > 1:
            frames: list[tuple[int, int, bytes]] = []  # (page, version, frame)
            for sid in small:
                got = fetch_frames(self.store, sid, [loc.entry for loc in by_sid[sid]])
                frames += [
                    (loc.entry.page, loc.version, got[loc.entry.page]) for loc in by_sid[sid]
                ]
            frames.sort()
            for i in range(0, len(frames), MERGED_SEGMENT_PAGES):
                chunk = frames[i : i + MERGED_SEGMENT_PAGES]
                data, entries = encode_frames((page, frame) for page, _, frame in chunk)
                sid = put_segment(self.store, data)
                for (page, version, _), entry in zip(chunk, entries):
                    loc = Located(version, sid, entry)
                    checkpoint.pages[page] = relocated[(page, version)] = loc
        self._put_checkpoint(checkpoint)
        return checkpoint

    def reload(self, vid: str) -> None:
        """Forget the cached map of ``vid``: the next request reads the latest checkpoint."""
        vol = self._volume(vid)
        with vol.lock:
            vol.loaded = False
        self._views = {k: v for k, v in self._views.items() if k[0] != vid}

    def _load(self, vol: _Volume) -> None:
        """Read the latest checkpoint and the log records after it. Caller holds the lock."""
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
                record = self._get_record(vol.vid, lsn)
                if record is None:
                    raise CorruptData(f"log record {lsn} of {vol.vid!r} vanished after listing")
                vol.apply(record)
            vol.loaded = True
            return
        raise StorageError(f"the checkpoints of {vol.vid!r} kept changing while being read")

    def _refresh(self, vol: _Volume) -> None:
        """Bring the cache up to the store's latest record. Caller holds ``vol.lock``."""
        if not vol.loaded:
            self._load(vol)
        # Other processes may have committed since the listing or the last probe.
        while (record := self._get_record(vol.vid, vol.latest + 1)) is not None:
            vol.apply(record)

    def _latest(self, vol: _Volume) -> int:
        self._refresh(vol)
        if not vol.latest:
            raise self._not_found(vol, f"volume {vol.vid!r} has no commits")
        return vol.latest

    def _ensure_lsn(self, vol: _Volume, lsn: int) -> None:
        """Make ``lsn`` cached, or raise. Past LSNs need no store access: records are immutable."""
        if not vol.loaded or lsn > vol.latest:
            self._refresh(vol)
        if not vol.latest:
            raise self._not_found(vol, f"volume {vol.vid!r} has no commits")
        if lsn > vol.latest:
            raise SnapshotNotFound(
                f"LSN {lsn} is beyond the latest LSN {vol.latest} of {vol.vid!r}"
            )

    def _get_record(self, vid: str, lsn: int) -> CommitRecord | None:
        for attempt in range(2):  # a damaged read in transit gets one more try
            data = self.store.get(log_key(vid, lsn))
            try:
                return None if data is None else CommitRecord.decode(data)
            except CorruptData:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _landed_or_conflict(self, vol: _Volume, base: int, digest: bytes) -> int:
        """For a commit on a stale ``base``: its earlier attempt landed, or a conflict."""
        if base < vol.latest:
            if base >= vol.base:
                landed = vol.commit_at(base + 1).hash
            else:
                record = self._get_record(vol.vid, base + 1)
                landed = record.hash if record is not None else b""
            if landed == digest:
                return base + 1
        if not vol.latest:
            raise VolumeNotFound(f"volume {vol.vid!r} has no commits, so no LSN {base}")
        raise CommitConflict(
            f"commit is based on LSN {base} but the latest LSN of {vol.vid!r} is {vol.latest}",
            latest_lsn=vol.latest,
        )
