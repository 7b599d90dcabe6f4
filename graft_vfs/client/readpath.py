"""The read path of one volume: memory cache, local store, fetches and what travels along.

A page is looked up in the memory cache, an LRU of ``page -> (row_lsn, data)`` valid for
every snapshot at or after ``row_lsn`` (every commit, pull and reset replaces or evicts
the entries of the pages it changed), then in the local store (a sequential reader's
misses read runs of pages in one query, which fill the memory cache: read-ahead), then
fetched from the server. A fetch takes along what the prefetch policy predicts
(``prefetch.Prefetcher`` for strides, ``prefetch.FrameSizer`` for clustered random
reads, sized with the link measured by ``link.Link``) and the interior B-tree pages the
server adds below a missed interior page; a scan's next windows are fetched in the
background (``readahead.ReadAhead``). Reads are remembered in memory (page, row,
time) for the local store's eviction, which takes them in one batch: the read path
writes nothing to disk but fetched pages.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from graft_vfs.client.link import Link
from graft_vfs.client.local import LocalStore
from graft_vfs.client.maintenance import USAGE_LOG
from graft_vfs.client.prefetch import (
    FOLLOW_MAX,
    FOLLOW_START,
    SIBLINGS_MAX,
    TREE_CHEAP_INFLIGHT_RTTS,
    TREE_INFLIGHT_RTTS,
    TREE_JOBS,
    TREE_MISSES,
    TREE_PROBE_FIRST,
    TREE_PROBE_MAX,
    TREE_PROBES,
    TREE_RETRY,
    TREE_WINDOW,
    TREE_WORKERS,
    FrameSizer,
    IndexFollow,
    LinkScheduler,
    Prefetcher,
    TreeMap,
    TreeWatch,
    background_on,
    congested,
    tree_batch,
    tree_budget,
    tree_is_cheap,
    tree_link_wide,
    tree_probe,
)
from graft_vfs.client.readahead import MARK_PAGES, ReadAhead
from graft_vfs.client.remote import Remote, Traffic, required
from graft_vfs.client.stats import Stats
from graft_vfs.core.btree import (
    LEAF_INDEX,
    LEAVES,
    MAX_DEPTH,
    SchemaEntry,
    decode_record,
    header_offset,
    index_leaf_rowids,
    is_interior,
    overflow_next,
    overflow_pages,
    page_links,
    parse_page,
    read_schema,
    usable_size,
)
from graft_vfs.core.errors import CorruptData, GraftError, InvalidRequest
from graft_vfs.core.graft import MAX_PAGES_PER_READ
from graft_vfs.core.identity import Identity
from graft_vfs.core.pages import ZERO_PAGE

log = logging.getLogger("graft_vfs")

# Interior B-tree pages the server may send along with a missed interior page: a
# lookup then costs about one round trip per B-tree (its leaf) instead of one per level.
INTERIOR_EXPAND = 256
# A tree prefetch splits each level over its workers, in requests of at least this many
# pages (and at most MAX_PAGES_PER_READ).
MIN_BATCH = 32
# An overflow chain is read page by page (each names the next): when a fetched leaf has
# cells that overflow, a miss on the first page of a chain fetches the pages after it
# too, guessing the chain is contiguous (SQLite allocates it so in a file written in
# order; a wrong guess costs bytes, never a wrong page), up to this many pages.
CHAIN_MAX = 64
# A leaf miss in a B-tree of at most this many leaves fetches all of them: SQLite reads
# small trees whole (sqlite_stat4 as it loads the schema, small tables), and the most it
# can cost is a few pages.
SMALL_TREE = 8
# Loading the schema, SQLite reads sqlite_stat1 and then these, whole: a miss in
# sqlite_stat1's root brings their roots along.
STAT_TABLES = ("sqlite_stat4", "sqlite_stat3", "sqlite_stat2")
# A sequential reader's misses in the memory cache read runs of pages from the local
# store in one query, doubling from 1 up to this many pages (512 KiB), and at most a
# quarter of the memory cache.
READ_AHEAD_MAX = 128
# A miss this close after the end of the last run still counts as sequential (a table
# scan reads a few interior pages between runs of leaves).
READ_AHEAD_SLACK = 8
# A stride prefetch this long (the third in a row: 8, 16, 32 pages) shows a scan: the
# windows after it are fetched in the background (``readahead.ReadAhead``). Shorter ones
# are a few neighbours read together (the schema, a small table), not worth a request.
READAHEAD_MIN = 32


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
        self._schema: tuple[int, list[SchemaEntry]] | None = None  # (lsn, entries)
        # B-tree awareness: which tree a page is in, index -> table follow-ups, and the
        # background fetch of the tree being read (``background``: on, off, or None:
        # on while the measured round trip is >= BACKGROUND_MIN_RTT).
        self.follow = IndexFollow()
        self.watch = TreeWatch()
        self.background: bool | None = None
        self.sched = LinkScheduler()  # demand reads first, background in what is left
        self.sched.congested = self._congested
        self.hints = True  # index -> table follow-ups (they ride along demand requests)
        self.ahead = ReadAhead(self._fetch_window)  # a sequential reader's next window
        self._trees: TreeMap | None = None
        self._trees_at = 0.0
        self._stamp = 0  # interior pages stored so far (in batches): a TreeMap's age
        self._jobs: dict[int, _TreeJob] = {}  # root -> its background fetch
        # (root, lsn) fetched whole (until: inf), or declined, until TREE_RETRY later
        self._fetched_trees: dict[tuple[int, int], float] = {}
        self._job_lock = threading.Lock()
        self._inflight: set[int] = set()  # pages in background batches now
        self._tree_rate: float | None = None  # bytes/s background rounds measured
        self._tree_rate_at = 0.0  # when, in time.monotonic()
        self._prober: _TreeJob | None = None  # the one job whose rounds measure the link
        self._chains: dict[int, int] = {}  # first overflow page -> pages in its chain
        self._usable = 0  # usable page size, once page 1 was fetched
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
        self.follow.read(pageno)
        marked = self._from_window(pageno, lsn)
        if marked is not None:
            return marked
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
            if pageno and data[0] == LEAF_INDEX:
                self.follow.index_leaf(lsn, pageno, self._next_leaf(pageno, lsn))
        return data

    def _from_window(self, pageno: int, lsn: int) -> bytes | None:
        """The page if a read-ahead window brought it (waiting for a window in flight):
        its mark (which starts the next window), or a page that landed meanwhile."""
        ahead = self.ahead
        if not ahead.busy():
            return None
        ahead.wait(pageno, lsn)
        entry = self.cache.get(pageno)
        if entry is not None and entry[0] <= lsn:
            self.stats.cache_hits += 1
            return entry[1]
        mark = ahead.take_mark(pageno, lsn)
        if mark is None:
            return None
        row_lsn, data = mark
        self.stats.cache_hits += 1
        self._note_use(pageno, row_lsn)
        self._remember(pageno, row_lsn, data, lsn)
        if not is_interior(data, pageno):
            self.frames.record(pageno)
        return data

    def _congested(self) -> bool:
        link = self.remote.link if self.remote is not None else None
        return link is not None and congested(link.rtt, link.floor)

    def background_on(self) -> bool:
        """Whether the background fetch runs now (None: by the measured round trip)."""
        return background_on(self.background, self.remote.link.floor if self.remote else 0.0)

    def _next_leaf(self, pageno: int, lsn: int) -> int | None:
        """The index leaf after ``pageno`` in its tree, if the current map knows it."""
        trees = self._trees
        if trees is None or trees.lsn != lsn:
            return None
        root = trees.owner.get(pageno)
        tree = trees.trees.get(root) if root is not None else None
        following = tree.following(pageno, 1) if tree is not None else []
        return following[0] if following else None

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

    def read_remote_pages(
        self, pages: list[int], remote_lsn: int, identity: Identity | None
    ) -> dict[int, bytes]:
        """``pages`` at a remote LSN the local log does not hold, in one request (not
        cached here): ``{page: 4096 bytes}``, each verified."""
        remote = required(self.remote)
        traffic = Traffic()
        try:
            with self.sched.demand_read():
                got = remote.read_pages(self.vid, remote_lsn, pages, traffic, identity=identity)
        finally:
            self.stats.count(traffic)
        self.stats.add(cache_misses=len(pages), pages_fetched=len(pages))
        return {p: got.get(p, (0, ZERO_PAGE))[1] for p in pages}

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
        stride = self.prefetcher.predict(pageno)
        ahead = stride or self._frame(pageno, remote.link)
        background = background_on(self.background, remote.link.floor)
        trees = self._tree_map(lsn, page_count) if self.hints or background else None
        along = []
        if trees is not None and self.hints:
            along = self._tree_pages(trees, pageno, lsn, remote.link)
        chain = self._chains.pop(pageno, 0)
        if chain > 1:
            along += range(pageno + 1, pageno + min(chain, CHAIN_MAX))
        busy = self._inflight  # a background batch brings these: no need to ask twice
        self._want_missing(
            wanted,
            (p for p in (*ahead, *along) if 0 <= p < page_count and p not in busy),
            lsn,
            sync_local,
        )
        traffic = Traffic()
        try:
            with self.sched.demand_read():
                got = remote.read_pages(
                    self.vid,
                    sync_remote,
                    wanted,
                    traffic,
                    expand=INTERIOR_EXPAND,
                    identity=identity,
                )
        finally:
            self.stats.count(traffic)
        # Interior pages the server sent along are stored too, if not local already.
        self._want_missing(wanted, got.keys() - wanted.keys(), lsn, sync_local)
        local.store_fetched(row_id, [(p, wanted[p], got[p][1]) for p in wanted])
        prefetched = [p for p in wanted if p != pageno]
        if prefetched:
            self.prefetcher.fetched(prefetched)
        if 0 in got or any(is_interior(d, p) for p, (_, d) in got.items()):
            self._stamp += 1  # the schema or interior pages arrived: a new TreeMap
        self.stats.add(pages_fetched=len(got), pages_prefetched=len(prefetched))
        data = got[pageno][1]
        self._remember(pageno, wanted[pageno], data, lsn)
        if stride:
            self._ahead_fetched([p for p in stride if p in wanted], wanted, got, lsn)
            if len(stride) >= READAHEAD_MIN and lsn == self._latest():
                self.ahead.start(stride[-1], stride[0] - pageno, len(stride), lsn, page_count)
        self._note_chains(pageno, data)
        if trees is not None and background and not is_interior(data, pageno):
            self._watch_tree(trees, pageno, lsn, page_count, remote.link)
        return data

    def _fetch_window(self, pages: list[int], lsn: int) -> list[tuple[int, int, bytes]]:
        """Fetch a read-ahead window (``readahead.ReadAhead``) at ``lsn``: its pages into
        the local store and, but for the first MARK_PAGES fetched (returned as the
        window's marks: ``(page, row_lsn, data)``), into the memory cache."""
        if lsn != self._latest():
            return []
        remote = required(self.remote)
        identity = self._identity_for(lsn)
        sync_local, sync_remote = self.local.sync_point(self.row_id, lsn)
        wanted: dict[int, int] = {}
        busy = self._inflight
        self._want_missing(wanted, (p for p in pages if p not in busy), lsn, sync_local)
        if not wanted:
            return []
        traffic = Traffic()
        busy.update(wanted)
        try:
            with self.sched.demand_read():  # the reader is about to wait for these
                got = remote.read_pages(self.vid, sync_remote, wanted, traffic, identity=identity)
        finally:
            busy.difference_update(wanted)
            self.stats.count(traffic)
        self.local.store_fetched(self.row_id, [(p, wanted[p], got[p][1]) for p in wanted])
        order = [p for p in pages if p in wanted]
        self.stats.add(
            pages_fetched=len(order), pages_prefetched=len(order), readahead_windows=1
        )
        self._ahead_fetched(order[MARK_PAGES:], wanted, got, lsn)
        return [(p, wanted[p], got[p][1]) for p in order[:MARK_PAGES]]

    def _ahead_fetched(
        self,
        pages: list[int],
        rows: dict[int, int],
        got: dict[int, tuple[int, bytes]],
        lsn: int,
    ) -> None:
        """Pages a sequential reader is about to read, just fetched: into the memory
        cache at once, not read back from the local store. Not recorded as read (they
        are not, yet): the stride prefetcher knows its run was read when the reader
        misses on the page after it, and the frame sizer learns from reads alone."""
        with self._lock:
            if lsn != self._latest():
                return
            for p in pages:
                self.cache_put(p, rows[p], got[p][1])
        self._note_uses((p, rows[p]) for p in pages)

    # -- B-tree awareness on the demand path ---------------------------------------

    def _note_chains(self, pageno: int, data: bytes) -> None:
        """Remember the overflow chains of a fetched leaf (first page -> length)."""
        if pageno == 0:
            try:
                self._usable = usable_size(data)
            except CorruptData:
                return
        off = header_offset(pageno)
        if not self._usable or len(data) <= off or data[off] not in LEAVES:
            return
        try:
            _, overflows = page_links(data, pageno, self._usable)
        except CorruptData:
            return  # SQLite says so when it reads the page
        if len(self._chains) > 1024:
            self._chains.clear()
        for first, left in overflows:
            self._chains[first] = overflow_pages(left, self._usable)

    def _tree_map(self, lsn: int, page_count: int) -> TreeMap | None:
        """The map of B-trees for hints; rebuilt when interior pages arrived or, at most
        once a second, when the snapshot moved (a stale map only makes a hint wrong:
        every page is still fetched at the right snapshot)."""
        trees = self._trees
        now = time.monotonic()
        if trees is not None and trees.stamp == self._stamp:
            if trees.lsn == lsn or now - self._trees_at < 1.0:
                return trees
        try:
            trees = TreeMap(lsn, self._stamp, page_count, lambda p: self.peek_page(p, lsn))
        except GraftError:  # a damaged local page: SQLite says so when it reads it
            return None
        self._trees, self._trees_at = trees, now
        return trees

    def _tree_pages(self, trees: TreeMap, pageno: int, lsn: int, link: Link) -> list[int]:
        """Pages of other B-trees that SQLite is about to read after ``pageno``.

        A miss in an index brings its table's root along (and with it, by expansion,
        the table's interior pages); a miss in an index leaf brings the index leaves
        after it too (``IndexFollow.sibling_count``). A table leaf missed after an index
        leaf of that table brings the leaves of the rowids that follow in the index
        leaf and in the local index leaves after it: a range over several index leaves
        costs a round trip for the index leaves and one for the table leaves.
        """
        out: list[int] = []
        root = trees.owner.get(pageno)
        tree = trees.trees.get(root) if root is not None else None
        if tree is not None and pageno in tree.leafset and len(tree.leaves) <= SMALL_TREE:
            out += tree.leaves
        if tree is not None and pageno == root and tree.entry.name.lower() == "sqlite_stat1":
            out += [t.entry.root for t in trees.trees.values() if t.entry.name in STAT_TABLES]
        if root is not None:
            table = trees.table_of(root)
            if table is not None:
                out.append(table.entry.root)
                if tree is not None and pageno in tree.leafset:
                    count = self.follow.sibling_count(lsn, pageno)
                    siblings = self._absent(tree.following(pageno, count), lsn)
                    if siblings:
                        self.follow.siblings_fetched(siblings)
                        out += siblings
        cap = int(min(FOLLOW_MAX, max(FOLLOW_START, link.rtt * link.bandwidth / link.page_bytes)))
        follow = self.follow.plan(
            lsn,
            pageno,
            lambda leaf: self._rowids_of(trees, leaf, lsn),
            cap,
            lambda leaf: self._local_following(trees, leaf, lsn),
        )
        if follow:
            self.follow.fetched(follow)
        return out + follow

    def _local_following(self, trees: TreeMap, leaf: int, lsn: int) -> list[int]:
        """The index leaves after ``leaf``, as far as the local interior pages tell: the
        follow reads them only as far as it needs, up to the first not held locally."""
        root = trees.owner.get(leaf)
        tree = trees.trees.get(root) if root is not None else None
        return tree.following(leaf, SIBLINGS_MAX) if tree is not None else []

    def _rowids_of(
        self, trees: TreeMap, leaf: int, lsn: int
    ) -> tuple[list[int], Callable[[int], int | None]] | None:
        """The rowids of the index leaf ``leaf``, and where its table keeps each."""
        root = trees.owner.get(leaf)
        table = trees.table_of(root) if root is not None else None
        data = self.peek_page(leaf, lsn)
        if table is None or data is None:
            return None
        try:
            rowids = index_leaf_rowids(data, leaf, trees.usable)
        except CorruptData:
            return None
        divider = self._record_after(trees, leaf, lsn)
        if divider is not None:
            rowids.append(divider)  # SQLite reads it between this leaf and the next
        table_root = table.entry.root
        return rowids, lambda rowid: trees.table_leaf(table_root, rowid)

    def _record_after(self, trees: TreeMap, leaf: int, lsn: int) -> int | None:
        """The rowid of the index record after the leaf ``leaf``, in an ancestor's cell
        (None at the index's end, or if not known without the network)."""
        node = leaf
        for _ in range(MAX_DEPTH):
            up = trees.parent.get(node)
            if up is None:
                return None
            parent, place = up
            data = self.peek_page(parent, lsn)
            if data is None:
                return None
            try:
                page = parse_page(data, parent, trees.usable)
                if place < len(page.cells):
                    cell = page.cells[place]
                    if cell.overflow is not None:
                        return None
                    values = decode_record(cell.payload, whole=True)
                    last = values[-1] if values else None
                    return last if type(last) is int else None
            except CorruptData:
                return None
            node = parent  # the rightmost child: the record is further up
        return None

    def _watch_tree(
        self, trees: TreeMap, pageno: int, lsn: int, page_count: int, link: Link
    ) -> None:
        """A leaf of a tree missed: start, feed or stop the background fetch."""
        root = trees.owner.get(pageno)
        if root is None:
            return
        now = time.monotonic()
        grant = tree_budget(link.rtt)
        with self._job_lock:
            jobs = self._jobs
            for r, other in list(jobs.items()):
                if other.finished.is_set():  # remembered by _tree_done if it was whole
                    del jobs[r]
                elif r != root and now - other.last_miss >= TREE_WINDOW:
                    other.cancel()  # the workload left that tree
                    del jobs[r]
            job = jobs.get(root)
            if job is not None:
                if job.lsn == lsn:
                    job.grant(grant, now)
                    return
                job.cancel()  # a commit, pull or reset moved the snapshot on
                del jobs[root]
            if self._fetched_trees.get((root, lsn), 0.0) > now:
                return  # fetched whole at this snapshot already, or declined lately
            misses = self.watch.miss(root, now)
            tree = trees.trees.get(root)
            if misses < TREE_MISSES or tree is None or grant <= 0 or len(jobs) >= TREE_JOBS:
                return
            pages = [p for p in (*tree.interior, *tree.leaves) if p != pageno]
            job = _TreeJob(root, lsn, page_count, pages, misses * grant, now)
            jobs[root] = job
        threading.Thread(
            target=self._run_job, args=(job,), name="graft-tree-fetch", daemon=True
        ).start()

    def _measure(self, nbytes: int, seconds: float, rtt: float) -> float | None:
        """The bandwidth one round of parallel background requests saw (None: too few
        bytes to tell).

        Link.bandwidth is measured per request, so it reads a link shared by parallel
        requests as a fraction of what it is: a round measures it whole.
        """
        if nbytes < 4096:
            return None
        return nbytes / max(seconds - rtt, seconds / 16)  # ``rtt`` is the floor: errs low

    def _probe_by(self, job: _TreeJob) -> bool:
        """Whether ``job`` may send probing rounds: one job at a time does, as the
        rounds of two trees at once would slow each other and read as a narrow link."""
        with self._job_lock:
            prober = self._prober
            if prober is None or prober is job or prober.finished.is_set():
                self._prober = job
                return True
            return False

    def _absent(self, pages: list[int], lsn: int) -> list[int]:
        """``pages`` not held locally at ``lsn``, in their order (one query per batch)."""
        lacking = self.local.without_data(self.row_id, pages, lsn)
        return [p for p in pages if p in lacking]

    def _run_job(self, job: _TreeJob) -> None:
        """Fetch a tree's pages in small batches while the budget and the workload last.

        Pages go to the local store only, with the same rows as a demand read at the
        job's snapshot; never to the memory cache, so a batch that lands after a
        commit, pull or reset cannot put an old page where a newer reader looks.
        """
        try:
            remote = required(self.remote)
            identity = self._identity_for(job.lsn)
            sync_local, sync_remote = self.local.sync_point(self.row_id, job.lsn)
            missing = self.local.missing_pages(self.row_id, job.lsn, job.page_count)
            # From the far end: a scan reading the tree forward meets it in the middle.
            todo = [p for p in reversed(job.pages) if p in missing]
            skipped = threading.Event()
            probes = 0  # rounds that measured the link
            if time.monotonic() - self._tree_rate_at > TREE_RETRY:
                self._tree_rate = None  # measured long ago (a cold server, another link)
            probe = TREE_PROBE_FIRST  # pages of the next probing round (none measured it)
            # The last probing round's (bytes, seconds); None after the first, which opened
            # the connections of the rounds after it.
            last_probe: tuple[int, float] | None = None
            warmed = False

            def fetch(chunk: list[int]) -> tuple[int, float]:
                """Bytes received and seconds on the link (0, 0.0 if nothing was sent)."""
                # What demand reads have not fetched meanwhile; then demand reads go
                # first: wait for room on the link.
                chunk = self._absent(chunk, job.lsn)
                if not chunk:
                    return 0, 0.0
                with self.sched.background_request(TREE_WINDOW) as ok:
                    if not ok:
                        skipped.set()  # demand reads kept the link busy all along
                        return 0, 0.0
                    self._inflight.update(chunk)
                    started = time.monotonic()
                    try:
                        return fetch_now(chunk), time.monotonic() - started
                    finally:
                        self._inflight.difference_update(chunk)

            def fetch_now(chunk: list[int]) -> int:
                traffic = Traffic()
                self._store_chunk(
                    remote, chunk, missing, (sync_local, sync_remote), identity, traffic
                )
                self.prefetcher.fetched(chunk)
                self.stats.add(pages_prefetched=len(chunk))
                return traffic.bytes_received

            link = remote.link

            def wide(rate: float) -> bool:
                return tree_link_wide(link.floor, rate)

            with ThreadPoolExecutor(max_workers=TREE_WORKERS) as pool:
                i = 0
                while i < len(todo) and self._latest() == job.lsn:
                    rate = budget = self._tree_rate
                    if rate is None and not self._probe_by(job):
                        if not job.wait_for_budget(None):
                            break  # cancelled
                        time.sleep(link.floor)  # another tree's rounds are measuring it
                        continue
                    share = TREE_INFLIGHT_RTTS
                    if rate is not None and self.background is None and not wide(rate):
                        # auto, on a narrow link: a round trip carries few pages, so
                        # the fetch would move many bytes to save few round trips.
                        job.declined = True
                        break
                    if rate is not None and tree_is_cheap(
                        (len(todo) - i) * link.page_bytes, link.floor, rate
                    ):
                        budget = float("inf")  # the rest costs little: all of it now
                        share = TREE_CHEAP_INFLIGHT_RTTS
                    elif rate is not None and probes >= TREE_PROBES:
                        # Measured, and far from cheap: on this link the tree would take
                        # link time from demand reads for longer than it could repay.
                        job.declined = True
                        break
                    if not job.wait_for_budget(budget):
                        break
                    # Sized by the link, never by the budget: a demand read waits at most
                    # a fraction of a round trip behind the requests in flight.
                    if rate is None:  # probing: rounds grow until one measures the link
                        workers, size = tree_probe(probe)
                    else:
                        workers, size = tree_batch(link.floor, rate, link.page_bytes, share)
                    self.sched.workers = workers
                    chunks = []
                    for _ in range(workers):
                        if i < len(todo):
                            chunks.append(todo[i : i + size])
                            i += size
                    sent = list(pool.map(fetch, chunks))
                    nbytes = sum(n for n, _ in sent)
                    job.spend(nbytes)
                    # The round's requests ran in parallel once each had room on the link
                    # (demand reads first), sharing it: on a narrow link they end about
                    # together. Their median time is the round's: one straggler (a busy
                    # server thread, a CPU shared with it) would read as a narrow link.
                    times = [t for _, t in sent if t] or [0.0]
                    seen = self._measure(nbytes, statistics.median(times), link.floor)
                    if rate is not None and seen is not None:
                        self._tree_rate = rate + 0.5 * (seen - rate)
                        self._tree_rate_at = time.monotonic()
                        probes += 1
                    elif rate is None and nbytes:
                        # Probing: what a round's time grew by over the last round's, 4
                        # times smaller, is its extra bytes crossing the link; the round
                        # trip and the CPU around each request cancel out. Rounds grow
                        # until that growth stands out of the jitter (a quarter of the
                        # round trip), or the largest probe: then its own rate, a floor.
                        took = statistics.median(times)
                        got = _probe_rate(last_probe, (nbytes, took), link.floor)
                        if got is None and probe >= TREE_PROBE_MAX:
                            got = seen
                        if got is not None:
                            self._tree_rate, self._tree_rate_at = got, time.monotonic()
                            probes += 1
                        else:
                            last_probe = (nbytes, took) if warmed else None
                            warmed = True
                            probe = min(probe * 4, TREE_PROBE_MAX)
                    if skipped.is_set():
                        break  # the link stayed busy: a later miss starts it over
                job.complete = i >= len(todo) and not skipped.is_set()
        except GraftError as exc:  # a background fetch only ever saves reads
            log.debug("background fetch of the tree at page %d stopped: %s", job.root + 1, exc)
        finally:
            self._tree_done(job)
            job.finished.set()

    def _tree_done(self, job: _TreeJob) -> None:
        """Remember a tree fetched whole, or declined, at its snapshot, as soon as its job
        ends (not at the next miss, which may never come): none starts there again."""
        if not (job.complete or job.declined):
            return
        with self._job_lock:
            if any(lsn != job.lsn for _, lsn in self._fetched_trees):
                self._fetched_trees.clear()  # only the latest snapshot's
            until = math.inf if job.complete else time.monotonic() + TREE_RETRY
            self._fetched_trees[(job.root, job.lsn)] = until

    def _want_missing(
        self, wanted: dict[int, int], pages: Iterable[int], lsn: int, sync_local: int
    ) -> None:
        """Add the pages not held locally at ``lsn``, with the row their content is from."""
        asked = [p for p in pages if p not in wanted]
        if not asked:
            return
        for p, marker in self.local.without_data(self.row_id, asked, lsn).items():
            wanted[p] = marker if marker is not None else sync_local

    def _frame(self, pageno: int, link: Link) -> range:
        """The aligned run of pages a random miss fetches (see prefetch.FrameSizer)."""
        width = self.frames.width(link.rtt, link.bandwidth, link.page_bytes)
        if width == 1:
            return range(0)
        start = pageno - pageno % width
        return range(start, start + width)

    def _store_chunk(
        self,
        remote: Remote,
        chunk: list[int],
        missing: dict[int, int | None],
        sync: tuple[int, int],
        identity: Identity | None,
        traffic: Traffic | None = None,
    ) -> dict[int, bytes]:
        """Fetch ``chunk`` at the remote LSN of ``sync`` (local, remote) and store each page
        with the row its content is from (its marker in ``missing``, else the sync point's)."""
        sync_local, sync_remote = sync
        traffic = traffic if traffic is not None else Traffic()
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
        return {p: got[p][1] for p in chunk}

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
            self._store_chunk(remote, chunk, missing, (sync_local, sync_remote), identity)
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

    # -- whole B-trees -------------------------------------------------------------

    def schema(self, lsn: int, page_count: int) -> list[SchemaEntry]:
        """The tables and indexes of snapshot ``lsn``, read from sqlite_schema's pages."""
        cached = self._schema
        if cached is not None and cached[0] == lsn:
            return cached[1]
        entries = read_schema(lambda p: self.read_page(p, lsn), page_count)
        self._schema = (lsn, entries)
        return entries

    def resolve_trees(self, lsn: int, page_count: int, names: Iterable[str]) -> list[SchemaEntry]:
        """The schema entries of ``names`` (tables or indexes, case-insensitive, as SQLite)."""
        entries = self.schema(lsn, page_count)
        by_name = {e.name.lower(): e for e in entries}
        out = []
        for name in names:
            entry = by_name.get(name.strip().lower())
            if entry is None:
                known = ", ".join(sorted(e.name for e in entries)) or "none"
                raise InvalidRequest(
                    f"volume {self.vid!r} has no table or index named {name!r}; "
                    f"its tables and indexes: {known}"
                )
            if entry not in out:
                out.append(entry)
        return out

    def prefetch_trees(
        self,
        lsn: int,
        page_count: int,
        names: list[str],
        progress: Callable[[int, int], None] | None,
        workers: int,
    ) -> dict[str, Any]:
        """Fetch every page of the B-trees ``names`` at the (pinned) snapshot ``lsn``.

        The trees are walked level by level: each level's pages that are not local
        are fetched in parallel (``workers`` requests at a time), and the pages of a
        level name the next (children of interior pages, then overflow pages of the
        cells, one link of each chain per level). ``progress(done, known)`` follows.
        """
        entries = self.resolve_trees(lsn, page_count, names)
        remote = required(self.remote)
        started = time.perf_counter()
        identity = self._identity_for(lsn)
        sync_local, sync_remote = self.local.sync_point(self.row_id, lsn)
        missing = self.local.missing_pages(self.row_id, lsn, page_count)
        usable = usable_size(self.read_page(0, lsn))
        # (page, overflow pages after it in its chain; -1 for a B-tree page)
        level = [(e.root, -1) for e in entries]
        seen = {e.root for e in entries}
        done = fetched = requests = 0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            while level:
                want = sorted(p for p, _ in level if p in missing)
                size = min(MAX_PAGES_PER_READ, max(MIN_BATCH, -(-len(want) // max(1, workers))))
                chunks = [want[i : i + size] for i in range(0, len(want), size)]

                def fetch(chunk: list[int]) -> dict[int, bytes]:
                    return self._store_chunk(
                        remote, chunk, missing, (sync_local, sync_remote), identity
                    )

                got: dict[int, bytes] = {}
                for part in pool.map(fetch, chunks):
                    got.update(part)
                fetched += len(got)
                requests += len(chunks)
                following: list[tuple[int, int]] = []
                for p, left in level:
                    data = got.get(p)
                    if data is None:
                        data = self._held(p, lsn)
                    if left < 0:
                        children, overflows = page_links(data, p, usable)
                        following += [(c, -1) for c in children]
                        following += [
                            (first, overflow_pages(rest, usable) - 1) for first, rest in overflows
                        ]
                    elif left > 0:
                        nxt = overflow_next(data, p, page_count)
                        if nxt is None:
                            raise CorruptData(f"the overflow chain through page {p + 1} ends early")
                        following.append((nxt, left - 1))
                for p, _ in following:
                    # Every level brings pages never seen: the walk ends on any input.
                    if p in seen or not 0 <= p < page_count:
                        raise CorruptData(
                            f"a B-tree of volume {self.vid!r} names page {p + 1} twice "
                            "or beyond the end of the database"
                        )
                    seen.add(p)
                done += len(level)
                level = following
                if progress is not None:
                    progress(done, done + len(level))
        self._stamp += 1  # interior pages arrived
        return {
            "trees": [e.name for e in entries],
            "pages": done,
            "pages_fetched": fetched,
            "requests": requests,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _held(self, pageno: int, lsn: int) -> bytes:
        """A page believed local: read without touching the prefetch statistics."""
        data = self.peek_page(pageno, lsn)
        # Evicted from the local store meanwhile: fetch it as a read would.
        return data if data is not None else self.read_page(pageno, lsn)

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


def _probe_rate(
    last: tuple[int, float] | None, this: tuple[int, float], floor: float
) -> float | None:
    """The link's rate from two probing rounds, ``(bytes, seconds)`` each: the bytes the
    later one moved beyond the earlier over the time it took beyond it; None while that
    time is within the jitter of a round trip of ``floor`` (a quarter of it)."""
    if last is None:
        return None
    more, longer = this[0] - last[0], this[1] - last[1]
    if more <= 0 or longer < floor * TREE_INFLIGHT_RTTS:
        return None
    return more / longer


class _TreeJob:
    """One background fetch of a B-tree: its pages, its byte budget, its end.

    ``waited`` is the time the workload has waited on misses in the tree (a round trip
    per miss); the job may move ``waited x bandwidth`` bytes. Until a round has
    measured the bandwidth, one round of the smallest batches may go.
    """

    def __init__(
        self, root: int, lsn: int, page_count: int, pages: list[int], waited: float, now: float
    ) -> None:
        self.root, self.lsn, self.page_count, self.pages = root, lsn, page_count, pages
        self.waited, self.bytes = waited, 0
        self.complete = False  # every page was fetched
        self.declined = False  # measured too big for the link: not started again
        self.last_miss = now
        self.finished = threading.Event()
        self._cancelled = False
        self._cond = threading.Condition()

    def grant(self, seconds: float, now: float) -> None:
        with self._cond:
            self.waited += seconds
            self.last_miss = now
            self._cond.notify_all()

    def spend(self, nbytes: int) -> None:
        with self._cond:
            self.bytes += nbytes

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def wait_for_budget(self, rate: float | None) -> bool:
        """True when the next round may go; False when cancelled or no budget came."""
        with self._cond:
            while not self._cancelled and rate is not None and self.bytes >= self.waited * rate:
                if not self._cond.wait(TREE_WINDOW):
                    return False
            return not self._cancelled
