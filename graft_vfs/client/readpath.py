"""The read path of one volume: memory cache, local store, fetches and what travels along.

A page is looked up in the memory cache, an LRU of ``page -> (row_lsn, data)`` valid for
every snapshot at or after ``row_lsn`` (every commit, pull and reset replaces or evicts
the entries of the pages it changed), then in the local store (a sequential reader's
misses read runs of pages in one query, which fill the memory cache: read-ahead), then
fetched from the server. A fetch takes along what the prefetch policy predicts
(``prefetch.Prefetcher`` for strides, ``prefetch.FrameSizer`` for clustered random
reads, sized with the link measured by ``link.Link``) and the interior B-tree pages the
server adds below a missed interior page. Reads are remembered in memory (page, row,
time) for the local store's eviction, which takes them in one batch: the read path
writes nothing to disk but fetched pages.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from graft_vfs.client.link import Link
from graft_vfs.client.local import LocalStore
from graft_vfs.client.maintenance import USAGE_LOG
from graft_vfs.client.prefetch import FrameSizer, Prefetcher
from graft_vfs.client.remote import Remote, Traffic, required
from graft_vfs.client.stats import Stats
from graft_vfs.core.btree import is_interior
from graft_vfs.core.graft import MAX_PAGES_PER_READ
from graft_vfs.core.identity import Identity
from graft_vfs.core.pages import ZERO_PAGE

# Interior B-tree pages the server may send along with a missed interior page: a
# lookup then costs about one round trip per B-tree (its leaf) instead of one per level.
INTERIOR_EXPAND = 256
# A sequential reader's misses in the memory cache read runs of pages from the local
# store in one query, doubling from 1 up to this many pages (512 KiB), and at most a
# quarter of the memory cache.
READ_AHEAD_MAX = 128
# A miss this close after the end of the last run still counts as sequential (a table
# scan reads a few interior pages between runs of leaves).
READ_AHEAD_SLACK = 8


class ReadPath:
    """Page reads of one volume: memory, then disk, then the server.

    ``lock`` is the volume's: it guards the memory cache together with the volume's
    latest snapshot (``latest()`` reads it), so a reader fills the cache only at the
    latest snapshot and a commit, pull or reset evicts atomically with moving it.
    ``identity_for(lsn)`` names the server volume pages of local snapshot ``lsn`` must
    come from (or raises Busy).
    """

    def __init__(
        self,
        local: LocalStore,
        remote: Remote | None,
        row_id: int,
        vid: str,
        stats: Stats,
        cache_pages: int,
        lock: threading.RLock,
        latest: Callable[[], int],
        identity_for: Callable[[int], Identity | None],
    ) -> None:
        self.local = local
        self.remote = remote
        self.row_id = row_id
        self.vid = vid
        self.stats = stats
        self.cache: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.cache_pages = cache_pages
        self.prefetcher = Prefetcher()
        self.frames = FrameSizer()
        self._lock = lock
        self._latest = latest
        self._identity_for = identity_for
        self._used: OrderedDict[int, tuple[int, int]] = OrderedDict()  # page -> (row, ns)
        self._used_lock = threading.Lock()
        # Read-ahead from the local store (heuristics only: races between threads cost
        # a run of the wrong length, never a wrong page).
        self._run_end = -1  # the page after the last run read from the local store
        self._run_pages = 1
        self._count_at: tuple[int, int] = (-1, 0)  # (local LSN, its page count)

    # -- reads ----------------------------------------------------------------------

    def read_page(self, pageno: int, lsn: int) -> bytes:
        """Page ``pageno`` as of local snapshot ``lsn`` (memory, then disk, then server)."""
        entry = self.cache.get(pageno)
        if entry is not None and entry[0] <= lsn:
            # Unlocked: this is the hot path, and a lost increment of a hit count
            # (two threads at once) costs less than a lock per read.
            self.stats.cache_hits += 1
            return entry[1]
        self.prefetcher.record(pageno)
        row = self._read_local(pageno, lsn)
        if row is not None and row[1] is not None:
            self.stats.local_hits += 1  # unlocked, as cache_hits
            data = row[1]
            self._note_use(pageno, row[0])
            self._remember(pageno, row[0], data, lsn)
        else:
            data = self._fetch(pageno, lsn, row[0] if row else None)
        if not is_interior(data, pageno):  # interior pages travel by expansion instead
            self.frames.record(pageno)
        return data

    def _read_local(self, pageno: int, lsn: int) -> tuple[int, bytes | None] | None:
        """The latest local row of ``pageno`` at ``lsn``; a sequential reader's next pages
        come along into the memory cache (read-ahead, for a reader of the latest snapshot).
        """
        run = 1
        if 0 <= pageno - self._run_end < READ_AHEAD_SLACK:
            run = min(self._run_pages * 2, READ_AHEAD_MAX, max(self.cache_pages // 4, 1))
        if run > 1 and lsn == self._latest():
            run = min(run, self._page_count(lsn) - pageno)
        else:
            run = 1
        self._run_pages = run
        self._run_end = pageno + run
        self.stats.local_reads += 1  # unlocked, as cache_hits
        if run <= 1:
            return self.local.read_page(self.row_id, pageno, lsn)
        found = None
        ahead = []
        for p, row_lsn, data in self.local.read_run(self.row_id, pageno, run, lsn):
            if p == pageno:
                found = (row_lsn, data)
            elif data is not None:
                ahead.append((p, row_lsn, data))
        if ahead:
            with self._lock:
                if lsn == self._latest():
                    for p, row_lsn, data in ahead:
                        self.cache_put(p, row_lsn, data)
            self._note_uses((p, row_lsn) for p, row_lsn, _ in ahead)
            # Read from below the memory cache, for the fetch policies too: a scan that
            # reaches pages not local yet keeps its stride.
            for p, _, data in ahead:
                self.prefetcher.record(p)
                if not is_interior(data, p):
                    self.frames.record(p)
        return found

    def _page_count(self, lsn: int) -> int:
        """The page count of local snapshot ``lsn`` (fixed once the snapshot exists)."""
        at, count = self._count_at
        if at != lsn:
            count = self.local.page_count_at(self.row_id, lsn)
            self._count_at = (lsn, count)
        return count

    def peek_page(self, pageno: int, lsn: int) -> bytes | None:
        """The page at ``lsn`` if it is available without the network, else None."""
        entry = self.cache.get(pageno)
        if entry is not None and entry[0] <= lsn:
            return entry[1]
        row = self.local.read_page(self.row_id, pageno, lsn)
        return row[1] if row is not None else None

    def read_remote_page(self, pageno: int, remote_lsn: int, identity: Identity | None) -> bytes:
        """Page ``pageno`` at a remote LSN the local log does not hold (not cached)."""
        remote = required(self.remote)
        traffic = Traffic()
        try:
            got = remote.read_pages(self.vid, remote_lsn, [pageno], traffic, identity=identity)
        finally:
            self.stats.count(traffic)
        self.stats.add(cache_misses=1, pages_fetched=1)
        return got.get(pageno, (0, ZERO_PAGE))[1]

    def _fetch(self, pageno: int, lsn: int, marker: int | None) -> bytes:
        remote = required(self.remote)
        identity = self._identity_for(lsn)
        self.stats.add(cache_misses=1)
        local, row_id = self.local, self.row_id
        sync_local, sync_remote = local.sync_point(row_id, lsn)
        # The content as of sync_remote is the content from the marker (the latest
        # known change at or before lsn) or, with no marker, from the sync point.
        wanted = {pageno: marker if marker is not None else sync_local}
        page_count = local.page_count_at(row_id, lsn)
        ahead = self.prefetcher.predict(pageno) or self._frame(pageno, remote.link)
        self._want_missing(wanted, (p for p in ahead if 0 <= p < page_count), lsn, sync_local)
        traffic = Traffic()
        try:
            got = remote.read_pages(
                self.vid, sync_remote, wanted, traffic, expand=INTERIOR_EXPAND, identity=identity
            )
        finally:
            self.stats.count(traffic)
        # Interior pages the server sent along are stored too, if not local already.
        self._want_missing(wanted, got.keys() - wanted.keys(), lsn, sync_local)
        local.store_fetched(row_id, [(p, wanted[p], got[p][1]) for p in wanted])
        prefetched = [p for p in wanted if p != pageno]
        if prefetched:
            self.prefetcher.fetched(prefetched)
        self.stats.add(pages_fetched=len(got), pages_prefetched=len(prefetched))
        data = got[pageno][1]
        self._remember(pageno, wanted[pageno], data, lsn)
        return data

    def _want_missing(
        self, wanted: dict[int, int], pages: Iterable[int], lsn: int, sync_local: int
    ) -> None:
        """Add the pages not held locally at ``lsn``, with the row their content is from."""
        for p in pages:
            if p in wanted:
                continue
            row = self.local.read_page(self.row_id, p, lsn)
            if row is None or row[1] is None:
                wanted[p] = row[0] if row is not None else sync_local

    def _frame(self, pageno: int, link: Link) -> range:
        """The aligned run of pages a random miss fetches (see prefetch.FrameSizer)."""
        width = self.frames.width(link.rtt, link.bandwidth, link.page_bytes)
        if width == 1:
            return range(0)
        start = pageno - pageno % width
        return range(start, start + width)

    def hydrate(
        self,
        lsn: int,
        page_count: int,
        progress: Callable[[int], None] | None,
        workers: int,
    ) -> dict[str, Any]:
        """Fetch every page of the (pinned) snapshot ``lsn`` that is not local yet.

        Requests of up to MAX_PAGES_PER_READ pages run ``workers`` at a time.
        """
        remote = required(self.remote)
        identity = self._identity_for(lsn)
        sync_local, sync_remote = self.local.sync_point(self.row_id, lsn)
        missing = self.local.missing_pages(self.row_id, lsn, page_count)
        pages = sorted(missing)
        chunks = [
            pages[i : i + MAX_PAGES_PER_READ] for i in range(0, len(pages), MAX_PAGES_PER_READ)
        ]
        started = time.perf_counter()

        def fetch(chunk: list[int]) -> int:
            traffic = Traffic()
            try:
                got = remote.read_pages(self.vid, sync_remote, chunk, traffic, identity=identity)
            finally:
                self.stats.count(traffic)
            rows = []
            for p in chunk:
                marker = missing[p]
                rows.append((p, marker if marker is not None else sync_local, got[p][1]))
            self.local.store_fetched(self.row_id, rows)
            self.stats.add(pages_fetched=len(chunk))
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

    # -- the memory cache (callers that change the snapshot hold the volume's lock) --

    def _remember(self, pageno: int, row_lsn: int, data: bytes, lsn: int) -> None:
        # Only a reader at the latest snapshot may fill the cache: an older reader's
        # page may already have been replaced by a newer commit.
        with self._lock:
            if lsn != self._latest():
                return
            self.cache_put(pageno, row_lsn, data)

    def cache_put(self, pageno: int, row_lsn: int, data: bytes) -> None:
        cache = self.cache
        cache[pageno] = (row_lsn, data)
        cache.move_to_end(pageno)
        while len(cache) > self.cache_pages:
            cache.popitem(last=False)

    def evict(self, changed: Iterable[int] | None) -> None:
        """Drop the entries of ``changed`` pages; None: anything may have changed."""
        if changed is None:
            self.cache.clear()
            return
        for pageno in changed:
            self.cache.pop(pageno, None)

    # -- recency, for the local store's eviction --------------------------------------

    def take_usage(self) -> list[tuple[int, int, int]]:
        """The reads remembered since the last call: ``(page, row_lsn, time_ns)``."""
        with self._used_lock:
            used, self._used = self._used, OrderedDict()
        return [(p, row_lsn, when) for p, (row_lsn, when) in used.items()]

    def _note_use(self, pageno: int, row_lsn: int) -> None:
        with self._used_lock:
            self._used[pageno] = (row_lsn, time.time_ns())
            self._used.move_to_end(pageno)
            if len(self._used) > USAGE_LOG:
                self._used.popitem(last=False)

    def _note_uses(self, pages: Iterable[tuple[int, int]]) -> None:
        """``_note_use`` for a run of ``(page, row_lsn)`` read together."""
        now = time.time_ns()
        with self._used_lock:
            used = self._used
            for pageno, row_lsn in pages:
                used[pageno] = (row_lsn, now)
                used.move_to_end(pageno)
            while len(used) > USAGE_LOG:
                used.popitem(last=False)
