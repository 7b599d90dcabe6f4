"""One volume of a client: its snapshot, pins, writer lock and local commits.

A volume is built from its parts: the local store, the server (or None), a callback
that schedules a background push after a local commit, and the size of its memory
cache. It owns its read path (``readpath.ReadPath``: memory cache, local store,
fetches) and its sync (``sync.Sync``: push, pull, reset); the runtime that opened it
only schedules.

The hot path (pin a snapshot, read a cached page, page count) touches only memory:
``snapshot`` is one tuple swapped atomically, and the read path's cache is valid for
every snapshot at or after each entry's row. A pinned snapshot is published in the
cache directory's pin table (a memory map), so the local store's maintenance, in any
process, keeps every version it reads.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from pyroaring import BitMap

from graft_vfs.client.local import LocalStore, VolumeRow
from graft_vfs.client.readpath import ReadPath
from graft_vfs.client.remote import Remote
from graft_vfs.client.sharing import PinSlot
from graft_vfs.client.stats import Stats
from graft_vfs.client.sync import Sync
from graft_vfs.core.errors import Busy, SnapshotExpired
from graft_vfs.core.faults import crash_point
from graft_vfs.core.identity import Identity


class _Reader:
    """A reader of the volume's latest snapshot that is not a connection (a hydrate)."""


class Volume:
    """One volume, shared by all the connections of a client in the process.

    Locks, always taken in this order (a lock is never taken while holding a later one):

    1. ``writer`` and its file lock across processes: one write transaction at a time,
       held by a connection from RESERVED until its transaction ends;
    2. ``sync.lock``: one push, pull or reset at a time;
    3. ``lock``: the snapshot, ``row``, the pin slots and the read path's memory cache;
    4. the local store's lock (inside each of its calls);
    5. leaves, which take no other lock: the read path's usage log and ``stats``.
    """

    def __init__(
        self,
        row: VolumeRow,
        local: LocalStore,
        remote: Remote | None,
        schedule_push: Callable[[Volume], None],
        cache_pages: int,
    ) -> None:
        self.local = local
        self.remote = remote
        self.vid = row.vid  # the volume's name
        self.row_id = row.row_id  # its row in the local store
        self.row = row
        self._schedule_push = schedule_push
        # (local LSN, page count) of the latest local snapshot; replaced, never mutated.
        self.snapshot: tuple[int, int] = (row.local_lsn, row.page_count)
        self.lock = threading.RLock()
        self.writer = threading.Lock()  # one writer per volume in this process...
        self._writer_file = local.writer_lock(self.vid)  # ...and across processes
        self.stats = Stats()
        self.reads = ReadPath(
            local,
            remote,
            self.row_id,
            self.vid,
            self.stats,
            cache_pages,
            self.lock,
            lambda: self.snapshot[0],
            self.identity_for,
        )
        self.sync = Sync(self, local, remote, self.row_id, self.vid, self.stats)
        self._fixed: set[int] = set()  # owners pinned for their lifetime (lsn=N)
        # (prune signal, log start): snapshots from there on were readable at that signal.
        self._checked: tuple[int | None, int] = (None, 0)
        self._slots: dict[int, PinSlot] = {}  # id(owner) -> its slot in the pin table
        local.track_usage(self.row_id, self.reads.take_usage)

    # -- pinned snapshots -------------------------------------------------------------

    def pin(self, owner: object, fixed: tuple[int, int] | None = None) -> tuple[int, int]:
        """Pin the snapshot a transaction of ``owner`` reads and return it.

        It is the latest snapshot, or ``fixed``, a past local snapshot, which stays
        pinned as long as ``owner`` exists. Maintenance in any process keeps every
        version a pinned snapshot reads (see sharing.PinTable).
        """
        key = id(owner)
        slot = self._slots.get(key) or self._slot_for(owner, key, fixed is not None)
        while True:
            snap = fixed or self.snapshot
            signal = slot.pin(self.row_id, snap[0])
            checked_signal, floor = self._checked
            if signal != checked_signal:
                # Maintenance ran since the last check, or is running: once it has
                # committed, snapshots from the start of the log on are readable.
                floor = self.local.settled_floor(self.row_id)
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

    def hold(self, owner: object, fixed: tuple[int, int] | None = None) -> tuple[int, int]:
        """Pin ``fixed``, or else the latest snapshot, for as long as ``owner`` exists.

        For a connection that reads one snapshot all its life (``lsn=N``, ``immutable=1``):
        pinned from its open on, since SQLite reads the header before it takes any lock
        (an immutable database, never a lock), so maintenance never compacts what it reads.
        """
        snap = self.pin(owner, fixed)
        with self.lock:
            self._fixed.add(id(owner))
        return snap

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

    # -- reads ----------------------------------------------------------------------

    def read_page(self, pageno: int, lsn: int) -> bytes:
        """Page ``pageno`` as of local snapshot ``lsn`` (memory, then disk, then server)."""
        return self.reads.read_page(pageno, lsn)

    def peek_page(self, pageno: int, lsn: int) -> bytes | None:
        """The page at ``lsn`` if it is available without the network, else None."""
        return self.reads.peek_page(pageno, lsn)

    def read_remote_page(self, pageno: int, remote_lsn: int) -> bytes:
        """Page ``pageno`` at a remote LSN that the local log does not hold."""
        return self.read_remote_pages([pageno], remote_lsn)[pageno]

    def read_remote_pages(self, pages: list[int], remote_lsn: int) -> dict[int, bytes]:
        """``pages`` at a remote LSN that the local log does not hold, in one request."""
        return self.reads.read_remote_pages(pages, remote_lsn, self.row.identity)

    def hydrate(
        self, progress: Callable[[int], None] | None = None, workers: int = 4
    ) -> dict[str, Any]:
        """Fetch every page of the latest snapshot that is not local yet."""
        token = _Reader()
        lsn, page_count = self.pin(token)
        try:
            return self.reads.hydrate(lsn, page_count, progress, workers)
        finally:
            self.unpin(token)

    def local_snapshot_of(self, remote_lsn: int) -> tuple[int, int] | None:
        """The local snapshot ``(lsn, page count)`` holding ``remote_lsn``, if still logged."""
        return self.local.local_for_remote(self.row_id, remote_lsn)

    def remote_lsn_at(self, lsn: int) -> int:
        """The remote LSN the local snapshot ``lsn`` is based on."""
        return self.local.sync_point(self.row_id, lsn)[1]

    def identity_for(self, lsn: int) -> Identity | None:
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
            if row.local_lsn < old:
                # Read before a commit, pull or reset of this process moved the snapshot
                # on: local LSNs only grow, so this row is older than what it knows.
                return
            if row.local_lsn != old:
                # None: the log was compacted past ``old``, so anything may have changed.
                self.reads.evict(self.local.changes(self.row_id, old, row.local_lsn))
                self.snapshot = (row.local_lsn, row.page_count)
            self.row = row

    def close(self) -> None:
        self.local.track_usage(self.row_id, None)
        self._writer_file.close()

    def commit(
        self, base: int, pages: dict[int, bytes], page_count: int, reads: BitMap | None = None
    ) -> tuple[int, int]:
        """Durably commit ``pages`` locally on top of ``base``; returns the new snapshot.

        ``reads``: the pages the transaction read, kept for a rebase (None: unknown).
        """
        lsn = self.local.commit(self.row_id, base, pages, page_count, reads)
        with self.lock:
            for pageno, data in pages.items():
                self.reads.cache_put(pageno, lsn, data)
            self.snapshot = (lsn, page_count)
            self.row.local_lsn = lsn
            self.row.page_count = page_count
        self.stats.add(commits_local=1)
        crash_point("client.commit.after_local")
        self._schedule_push(self)
        return self.snapshot

    def advance(self, lsn: int, page_count: int, changed: BitMap) -> None:
        """A pull or reset made ``lsn`` the latest local snapshot, changing ``changed``."""
        with self.lock:
            self.reads.evict(changed)
            if lsn > self.snapshot[0]:  # a reload may have gone past it already
                self.snapshot = (lsn, page_count)

    def refresh(self) -> VolumeRow:
        """Reload the sync state from the local store."""
        row = self.local.load_volume(self.vid)
        assert row is not None
        with self.lock:
            self.row = row
        return row

    def counters(self) -> dict[str, int]:
        """The statistics of ``PRAGMA graft_stats``."""
        self.stats.prefetch_unused = self.reads.prefetcher.unused
        return self.stats.as_dict()

    def status(self) -> dict[str, Any]:
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
            "last_error": self.sync.last_error,
        }
