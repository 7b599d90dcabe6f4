"""One volume inside a runtime: its snapshot, page reads, local commits and statistics.

The hot path (pin a snapshot, read a cached page, page count) touches only memory:
``snapshot`` is one tuple swapped atomically, and the page cache is an LRU of
``page -> (row_lsn, data)`` that is valid for every snapshot at or after ``row_lsn``
because every change to a page (commit, pull, reset) replaces or evicts its entry.
A pinned snapshot is published in the cache directory's pin table (a memory map), so
the local store's maintenance, in any process, keeps every version it reads.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pyroaring import BitMap

from graft_vfs.client.link import Link
from graft_vfs.client.local import USAGE_LOG, PinSlot, VolumeRow
from graft_vfs.client.prefetch import FrameSizer, Prefetcher
from graft_vfs.client.remote import Remote, Transfer
from graft_vfs.core.btree import is_interior
from graft_vfs.core.errors import Busy, SnapshotExpired
from graft_vfs.core.faults import crash_point
from graft_vfs.core.graft import MAX_PAGES_PER_READ
from graft_vfs.core.identity import Identity
from graft_vfs.core.pages import ZERO_PAGE

# Interior B-tree pages the server may send along with a missed interior page: a
# lookup then costs about one round trip per B-tree (its leaf) instead of one per level.
INTERIOR_EXPAND = 256

if TYPE_CHECKING:
    from graft_vfs.client.runtime import Runtime


@dataclass
class Stats:
    """Counters reported by ``PRAGMA graft_stats``."""

    pages_fetched: int = 0
    bytes_fetched: int = 0
    requests: int = 0
    cache_hits: int = 0  # pages served from memory
    local_hits: int = 0  # pages served from the local store on disk
    cache_misses: int = 0  # pages that had to come from the server
    pages_prefetched: int = 0  # fetched ahead of a read, along with a missed page
    prefetch_unused: int = 0  # prefetched pages not read (yet)
    commits_local: int = 0
    commits_pushed: int = 0
    pages_pushed: int = 0
    bytes_pushed: int = 0
    commits_pulled: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def count(self, t: Transfer, *, push: bool = False) -> None:
        self.requests += t.requests
        if push:
            self.bytes_pushed += t.bytes_sent
        else:
            self.bytes_fetched += t.bytes_received


class _Reader:
    """A reader of the volume's latest snapshot that is not a connection (a hydrate)."""


class Volume:
    """A volume opened by a runtime; shared by all its connections in the process."""

    def __init__(self, runtime: Runtime, row: VolumeRow, cache_pages: int) -> None:
        self.runtime = runtime
        self.local = runtime.local
        self.vid = row.vid
        self.id = row.id
        self.row = row
        # (local LSN, page count) of the latest local snapshot; replaced, never mutated.
        self.snapshot: tuple[int, int] = (row.local_lsn, row.page_count)
        self.lock = threading.RLock()
        self.writer = threading.Lock()  # one writer per volume in this process...
        self._writer_file = self.local.writer_lock(self.vid)  # ...and across processes
        self.sync_lock = threading.RLock()  # one push/pull/reset at a time
        self.cache: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.cache_pages = cache_pages
        self.stats = Stats()
        self.prefetcher = Prefetcher()
        self.frames = FrameSizer()
        self.last_error: str | None = None
        self._fixed: set[int] = set()  # owners pinned for their lifetime (lsn=N)
        # (prune signal, log start): snapshots from there on were readable at that signal.
        self._checked: tuple[int | None, int] = (None, 0)
        self._slots: dict[int, PinSlot] = {}  # id(owner) -> its slot in the pin table
        self._used: OrderedDict[int, tuple[int, int]] = OrderedDict()  # page -> (row, ns)
        self._used_lock = threading.Lock()
        self.local.track_usage(self.id, self._take_usage)

    # -- pinned snapshots -------------------------------------------------------------

    def pin(self, owner: object, fixed: tuple[int, int] | None = None) -> tuple[int, int]:
        """Pin the snapshot a transaction of ``owner`` reads and return it.

        It is the latest snapshot, or ``fixed``, a past local snapshot, which stays
        pinned as long as ``owner`` exists. Maintenance in any process keeps every
        version a pinned snapshot reads (see local.PinTable).
        """
        key = id(owner)
        slot = self._slots.get(key) or self._slot_for(owner, key, fixed is not None)
        while True:
            snap = fixed or self.snapshot
            signal = slot.pin(self.id, snap[0])
            checked_signal, floor = self._checked
            if signal != checked_signal:
                # Maintenance ran since the last check, or is running: once it has
                # committed, snapshots from the start of the log on are readable.
                floor = self.local.settled_floor(self.id)
                self._checked = (signal, floor)
            if snap[0] >= floor:
                return snap
            if fixed is not None:
                slot.unpin()
                raise SnapshotExpired(
                    f"local LSN {snap[0]} of volume {self.vid!r} was compacted away while "
                    "the connection opened: open it again (it then reads from the server)"
                )
            self.reload()  # a newer latest snapshot, never compacted

    def unpin(self, owner: object) -> None:
        """``owner``'s transaction ended (a lifetime pin stays until ``owner`` goes)."""
        key = id(owner)
        if key not in self._fixed:
            slot = self._slots.get(key)
            if slot is not None:
                slot.unpin()

    def _slot_for(self, owner: object, key: int, lifetime: bool) -> PinSlot:
        slot = self.local.pins.take()
        with self.lock:
            self._slots[key] = slot
            if lifetime:
                self._fixed.add(key)
        weakref.finalize(owner, self._forget, key)
        return slot

    def _forget(self, key: int) -> None:
        with self.lock:
            slot = self._slots.pop(key, None)
            self._fixed.discard(key)
        if slot is not None:
            self.local.pins.give(slot)

    def _take_usage(self) -> list[tuple[int, int, int]]:
        with self._used_lock:
            used, self._used = self._used, OrderedDict()
        return [(p, row_lsn, when) for p, (row_lsn, when) in used.items()]

    def _note_use(self, pageno: int, row_lsn: int) -> None:
        with self._used_lock:
            self._used[pageno] = (row_lsn, time.time_ns())
            self._used.move_to_end(pageno)
            if len(self._used) > USAGE_LOG:
                self._used.popitem(last=False)

    # -- reads ----------------------------------------------------------------------

    def read_page(self, pageno: int, lsn: int) -> bytes:
        """Page ``pageno`` as of local snapshot ``lsn`` (memory, then disk, then server)."""
        entry = self.cache.get(pageno)
        if entry is not None and entry[0] <= lsn:
            self.stats.cache_hits += 1
            return entry[1]
        self.prefetcher.record(pageno)
        row = self.local.read_page(self.id, pageno, lsn)
        if row is not None and row[1] is not None:
            self.stats.local_hits += 1
            data = row[1]
            self._note_use(pageno, row[0])
            self._remember(pageno, row[0], data, lsn)
        else:
            data = self._fetch(pageno, lsn, row[0] if row else None)
        if not is_interior(data, pageno):  # interior pages travel by expansion instead
            self.frames.record(pageno)
        return data

    def peek_page(self, pageno: int, lsn: int) -> bytes | None:
        """The page at ``lsn`` if it is available without the network, else None."""
        entry = self.cache.get(pageno)
        if entry is not None and entry[0] <= lsn:
            return entry[1]
        row = self.local.read_page(self.id, pageno, lsn)
        return row[1] if row is not None else None

    def _identity_for(self, lsn: int) -> Identity | None:
        """The server volume that pages of local snapshot ``lsn`` must come from.

        Sent with every page read, so the server refuses to answer for another volume.
        """
        row = self.row
        if row.identity is not None and lsn < row.identity_lsn:
            # Its remote LSNs name pages of the volume the cache was refilled from.
            raise Busy(
                f"volume {self.vid!r} was refilled from another volume on the server while "
                "this transaction was open: roll back and retry it"
            )
        return row.identity

    def _fetch(self, pageno: int, lsn: int, marker: int | None) -> bytes:
        remote = self.runtime.require_remote()
        identity = self._identity_for(lsn)
        self.stats.cache_misses += 1
        local = self.local
        sync_local, sync_remote = local.sync_point(self.id, lsn)
        # The content as of sync_remote is the content from the marker (the latest
        # known change at or before lsn) or, with no marker, from the sync point.
        wanted = {pageno: marker if marker is not None else sync_local}
        page_count = local.page_count_at(self.id, lsn)
        for p in self.prefetcher.predict(pageno) or self._frame(pageno, remote.link):
            if 0 <= p < page_count and p not in wanted:
                row = local.read_page(self.id, p, lsn)
                if row is None or row[1] is None:
                    wanted[p] = row[0] if row is not None else sync_local
        transfer = Transfer()
        try:
            got = remote.read_pages(
                self.vid, sync_remote, wanted, transfer, expand=INTERIOR_EXPAND, identity=identity
            )
        finally:
            self.stats.count(transfer)
        self.stats.pages_fetched += len(got)
        for p in got.keys() - wanted.keys():  # interior pages the server sent along
            row = local.read_page(self.id, p, lsn)
            if row is None or row[1] is None:
                wanted[p] = row[0] if row is not None else sync_local
        local.store_fetched(self.id, [(p, wanted[p], got[p][1]) for p in wanted])
        ahead = [p for p in wanted if p != pageno]
        if ahead:
            self.prefetcher.fetched(ahead)
            self.stats.pages_prefetched += len(ahead)
        data = got[pageno][1]
        self._remember(pageno, wanted[pageno], data, lsn)
        return data

    def hydrate(self, progress: Callable[[int], None] | None = None, workers: int = 4) -> dict:
        """Fetch every page of the latest snapshot that is not local yet.

        Requests of up to MAX_PAGES_PER_READ pages run ``workers`` at a time.
        """
        remote = self.runtime.require_remote()
        token = _Reader()
        lsn, page_count = self.pin(token)
        try:
            return self._hydrate(remote, lsn, page_count, progress, workers)
        finally:
            self.unpin(token)

    def _hydrate(
        self,
        remote: Remote,
        lsn: int,
        page_count: int,
        progress: Callable[[int], None] | None,
        workers: int,
    ) -> dict:
        identity = self._identity_for(lsn)
        sync_local, sync_remote = self.local.sync_point(self.id, lsn)
        missing = self.local.missing_pages(self.id, lsn, page_count)
        pages = sorted(missing)
        chunks = [
            pages[i : i + MAX_PAGES_PER_READ] for i in range(0, len(pages), MAX_PAGES_PER_READ)
        ]
        started = time.perf_counter()

        def fetch(chunk: list[int]) -> int:
            transfer = Transfer()
            try:
                got = remote.read_pages(
                    self.vid, sync_remote, chunk, transfer, identity=identity
                )
            finally:
                self.stats.count(transfer)
            rows = [
                (p, missing[p] if missing[p] is not None else sync_local, got[p][1]) for p in chunk
            ]
            self.local.store_fetched(self.id, rows)
            self.stats.pages_fetched += len(chunk)
            if progress is not None:
                progress(len(chunk))
            return len(chunk)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            fetched = sum(pool.map(fetch, chunks))
        return {
            "pages_fetched": fetched,
            "page_count": page_count,
            "requests": len(chunks),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _frame(self, pageno: int, link: Link) -> range:
        """The aligned run of pages a random miss fetches (see prefetch.FrameSizer)."""
        width = self.frames.width(link.rtt, link.bandwidth, link.page_bytes)
        if width == 1:
            return range(0)
        start = pageno - pageno % width
        return range(start, start + width)

    def _remember(self, pageno: int, row_lsn: int, data: bytes, lsn: int) -> None:
        # Only a reader at the latest snapshot may fill the cache: an older reader's
        # page may already have been replaced by a newer commit.
        with self.lock:
            if lsn != self.snapshot[0]:
                return
            self._cache_put(pageno, row_lsn, data)

    def _cache_put(self, pageno: int, row_lsn: int, data: bytes) -> None:
        cache = self.cache
        cache[pageno] = (row_lsn, data)
        cache.move_to_end(pageno)
        while len(cache) > self.cache_pages:
            cache.popitem(last=False)

    # -- writes ---------------------------------------------------------------------

    def acquire_writer(self) -> bool:
        """Take the volume's writer lock without waiting; False if someone holds it."""
        if not self.writer.acquire(blocking=False):
            return False
        if not self._writer_file.try_acquire():
            self.writer.release()
            return False
        return True

    def release_writer(self) -> None:
        self._writer_file.release()
        self.writer.release()

    def writer_held(self) -> bool:
        return self.writer.locked()

    def reload(self) -> None:
        """Catch up with changes another process made to the local store."""
        row = self.local.load_volume(self.vid)
        assert row is not None
        with self.lock:
            old = self.snapshot[0]
            if row.local_lsn != old:
                changed = self.local.changes(self.id, old, row.local_lsn)
                if changed is None:  # the log was compacted past ``old``: anything changed
                    self.cache.clear()
                else:
                    for pageno in changed:
                        self.cache.pop(pageno, None)
                self.snapshot = (row.local_lsn, row.page_count)
            self.row = row

    def close(self) -> None:
        self.local.track_usage(self.id, None)
        self._writer_file.close()

    def commit(self, base: int, pages: dict[int, bytes], page_count: int) -> tuple[int, int]:
        """Durably commit ``pages`` locally on top of ``base``; returns the new snapshot."""
        lsn = self.local.commit(self.id, base, pages, page_count)
        with self.lock:
            for pageno, data in pages.items():
                self._cache_put(pageno, lsn, data)
            self.snapshot = (lsn, page_count)
            self.row.local_lsn = lsn
            self.row.page_count = page_count
        self.stats.commits_local += 1
        crash_point("client.commit.after_local")
        self.runtime.schedule_push(self)
        return self.snapshot

    def advance(self, lsn: int, page_count: int, changed: BitMap) -> None:
        """A pull or reset made ``lsn`` the latest local snapshot, changing ``changed``."""
        with self.lock:
            for pageno in changed:
                self.cache.pop(pageno, None)
            self.snapshot = (lsn, page_count)

    def refresh(self) -> VolumeRow:
        """Reload the sync state from the local store."""
        row = self.local.load_volume(self.vid)
        assert row is not None
        with self.lock:
            self.row = row
        return row

    # -- reads at a past LSN that the local log does not hold --------------------------

    def read_remote_page(self, pageno: int, remote_lsn: int) -> bytes:
        remote = self.runtime.require_remote()
        transfer = Transfer()
        try:
            got = remote.read_pages(
                self.vid, remote_lsn, [pageno], transfer, identity=self.row.identity
            )
        finally:
            self.stats.count(transfer)
        self.stats.cache_misses += 1
        self.stats.pages_fetched += 1
        return got.get(pageno, (0, ZERO_PAGE))[1]

    def status(self) -> dict:
        row = self.refresh()
        return {
            "volume": self.vid,
            "local_lsn": row.local_lsn,
            "remote_lsn": row.remote_lsn,
            "synced_local_lsn": row.sync_lsn,
            "page_count": row.page_count,
            "pending_push": row.pending,
            "push_in_flight": row.push_intent is not None,
            "diverged": row.diverged,
            "last_error": self.last_error,
        }
