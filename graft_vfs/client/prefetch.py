"""Prefetching: Leap-style stride detection over the pages a volume reads cold.

Every page read that misses the in-memory cache is recorded (reads served from
memory are the hot path and stay untouched). On a miss, a majority vote over the
deltas between recent accesses finds the stride SQLite is walking (a table scan
walks leaves forward); while the same stride keeps winning, the look-ahead doubles,
so a sequential scan moves from one page per request to MAX_AHEAD pages per request,
and a random lookup never drags extra pages along.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from graft_vfs.core.btree import (
    INTERIOR_TABLE,
    MAX_DEPTH,
    SchemaEntry,
    header_offset,
    interior_links,
    is_interior,
    parse_page,
    read_schema,
    usable_size,
)
from graft_vfs.core.errors import CorruptData

WINDOW = 8  # recent accesses the vote looks at
MIN_VOTES = 3  # a stride must repeat this often before anything is prefetched
MIN_AHEAD = 8
MAX_AHEAD = 256  # 1 MiB of pages per request at most
RUN_SLACK = 8  # a miss this close after a predicted run continues it


class Prefetcher:
    """Predicts the pages worth fetching along with a missed page."""

    def __init__(self, window: int = WINDOW, max_ahead: int = MAX_AHEAD) -> None:
        self.max_ahead = max_ahead
        self._history: deque[int] = deque(maxlen=window + 1)
        self._ahead = 0
        self._stride = 0
        self._outstanding: set[int] = set()  # prefetched and not read yet
        self._run: list[int] = []  # the pages predicted last
        self._expect = -1  # the page after them: a miss there means the run was read
        self._lock = threading.Lock()
        self.prefetched = 0
        self.used = 0

    def record(self, pageno: int) -> None:
        """A page was read from below the memory cache."""
        with self._lock:
            self._history.append(pageno)
            if pageno in self._outstanding:
                self._outstanding.discard(pageno)
                self.used += 1

    def predict(self, pageno: int) -> list[int]:
        """Pages to fetch along with ``pageno`` (which missed and was just recorded)."""
        with self._lock:
            if self._ahead and 0 <= (pageno - self._expect) * self._stride < RUN_SLACK * abs(
                self._stride
            ):
                # The reader went through the last run (served from memory, so unseen
                # here) and on to the page after it, or a few further (it skipped pages
                # held locally, as a table's interior pages): the stride holds.
                read = self._outstanding.intersection(self._run)
                self.used += len(read)
                self._outstanding -= read
                self._ahead = min(self._ahead * 2, self.max_ahead)
                stride = self._stride
            else:
                h = list(self._history)
                deltas = [b - a for a, b in zip(h, h[1:])]
                if not deltas:
                    return []
                stride, votes = Counter(deltas).most_common(1)[0]
                if stride == 0 or votes < MIN_VOTES or votes * 2 <= len(deltas):
                    self._ahead, self._run, self._expect = 0, [], -1
                    return []
                if stride == self._stride and self._ahead:
                    self._ahead = min(self._ahead * 2, self.max_ahead)
                else:
                    self._stride, self._ahead = stride, MIN_AHEAD
            self._run = [pageno + stride * i for i in range(1, self._ahead + 1)]
            self._expect = self._run[-1] + stride
            return self._run

    def fetched(self, pages: list[int]) -> None:
        with self._lock:
            self._outstanding.update(pages)
            self.prefetched += len(pages)

    @property
    def unused(self) -> int:
        return self.prefetched - self.used


FRAME_WIDTHS = (1, 2, 4, 8, 16, 32, 64)
SIZER_WINDOW = 4096  # accesses before the statistics start over (the workload may change)
SIZER_WARMUP = 16  # accesses before anything but single pages is considered
WIDER_MARGIN = 0.9  # a wider frame is chosen only if it is expected 10% cheaper


class FrameSizer:
    """Chooses how many aligned pages a random miss should fetch, by expected cost.

    For each candidate width W it counts how many recent cold accesses fell into an
    aligned run of W pages that an earlier access had already touched: the fraction
    ``h(W)`` of fetches a W-page frame would have saved. The expected cost of a miss
    with frames of W is ``(1 - h(W)) * (rtt + W * page_bytes / bandwidth)``; the width
    with the lowest cost wins. Sparse random reads keep single pages; reads that
    cluster (many lookups in one table) grow the frame, more readily on a link with a
    long round trip and plenty of bandwidth, less on a slow one.
    """

    def __init__(self, widths: tuple[int, ...] = FRAME_WIDTHS) -> None:
        self.widths = widths
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._seen: list[set[int]] = [set() for _ in self.widths]
        self._saved = [0] * len(self.widths)
        self._total = 0

    def record(self, pageno: int) -> None:
        with self._lock:
            if self._total >= SIZER_WINDOW:
                self._reset()
            self._total += 1
            for i, w in enumerate(self.widths):
                frame = pageno // w
                if frame in self._seen[i]:
                    self._saved[i] += 1
                else:
                    self._seen[i].add(frame)

    def width(self, rtt: float, bandwidth: float, page_bytes: float) -> int:
        with self._lock:
            if self._total < SIZER_WARMUP:
                return 1
            best, best_cost = 1, float("inf")
            for w, saved in zip(self.widths, self._saved):
                cost = (1 - saved / self._total) * (rtt + w * page_bytes / bandwidth)
                # A wider frame must win clearly: a few chance neighbours among
                # sparse lookups are no reason to move more bytes on every miss.
                if cost < best_cost * WIDER_MARGIN:
                    best, best_cost = w, cost
            return best


# -- B-trees: which tree a page is in, index -> table follow-ups, background fetch -------


class _NotLocal(Exception):
    pass


@dataclass
class Tree:
    """One B-tree of a snapshot as far as its local interior pages tell."""

    entry: SchemaEntry
    interior: list[int] = field(default_factory=list)
    leaves: list[int] = field(default_factory=list)  # in key order
    leafset: set[int] = field(default_factory=set)

    _place: dict[int, int] | None = None  # leaf -> its place in ``leaves``

    def following(self, leaf: int, count: int) -> list[int]:
        """Up to ``count`` leaves after ``leaf`` in key order (its right siblings, and
        their parents' next children after them)."""
        if count <= 0 or leaf not in self.leafset:
            return []
        if self._place is None:
            self._place = {p: i for i, p in enumerate(self.leaves)}
        i = self._place[leaf]
        return self.leaves[i + 1 : i + 1 + count]


class TreeMap:
    """Which B-tree each page of one snapshot is in, from the pages held locally.

    Built without the network: sqlite_schema's pages and each tree's interior pages
    are read only if local (the server sends a tree's interior levels along with its
    root, so after the first read of a tree they usually are); a subtree below a page
    that is not local is unknown. ``stamp`` is the read path's count of interior pages
    stored when the map was built: a map is rebuilt when the snapshot or it changes.
    """

    def __init__(
        self,
        lsn: int,
        stamp: int,
        page_count: int,
        peek: Callable[[int], bytes | None],
    ) -> None:
        self.lsn, self.stamp = lsn, stamp
        self.trees: dict[int, Tree] = {}
        self.owner: dict[int, int] = {}  # page -> root of its tree
        # interior table page -> (keys, children): a rowid k is under the first key >= k;
        # the keys are read from the page the first time a lookup goes through it
        self._keys: dict[int, tuple[list[int], list[int]]] = {}
        self._unread: dict[int, bytes] = {}  # interior table pages whose keys are not read
        # page of an index -> (its parent, its place among the parent's children): the
        # record after the page in key order is the parent's cell at that place
        self.parent: dict[int, tuple[int, int]] = {}
        self.usable = 0
        self._peek = peek
        self._page_count = page_count
        try:
            page1 = self._read(0)
            self.usable = usable_size(page1)
            entries = read_schema(self._read, page_count)
        except (_NotLocal, CorruptData):
            return  # SQLite reads the schema first: a later map will have it
        for entry in entries:
            try:
                self.trees[entry.root] = self._tree(entry)
            except CorruptData:
                continue  # SQLite will say so when it reads the page
        self._peek = _no_peek  # built: hold no reference to the read path

    def _read(self, pageno: int) -> bytes:
        data = self._peek(pageno)
        if data is None:
            raise _NotLocal
        return data

    def _tree(self, entry: SchemaEntry) -> Tree:
        tree = Tree(entry)
        level, seen = [entry.root], {entry.root}
        for _ in range(MAX_DEPTH):
            children: list[int] = []
            for p in level:
                self.owner[p] = entry.root
                data = self._peek(p)
                if data is None:
                    continue  # its subtree is unknown until it is local
                if not is_interior(data, p):
                    parse_page(data, p, self.usable)  # CorruptData if it is no B-tree page
                    tree.leaves.append(p)  # a one-page tree
                    tree.leafset.add(p)
                    continue
                tree.interior.append(p)
                below, _ = interior_links(data, p, self.usable, keys=False)
                children += below
                if data[header_offset(p)] == INTERIOR_TABLE:
                    self._unread[p] = data
                else:
                    for i, c in enumerate(below):
                        self.parent[c] = (p, i)
            if not children:
                return tree
            if (
                not seen.isdisjoint(children)
                or len(set(children)) < len(children)
                or max(children) >= self._page_count
            ):  # (interior_links saw no child below 0)
                raise CorruptData(f"the B-tree at page {entry.root + 1} loops")
            seen.update(children)
            probe = self._peek(children[0])
            # Balanced: one child tells the level. A child not held is taken for a leaf:
            # the interior levels come along with the root.
            if probe is None or not is_interior(probe, children[0]):
                self.owner.update(dict.fromkeys(children, entry.root))
                tree.leaves += children
                tree.leafset.update(tree.leaves)
                return tree
            level = children
        raise CorruptData(f"the B-tree at page {entry.root + 1} is too deep")

    def table_leaf(self, root: int, rowid: int) -> int | None:
        """The leaf of the rowid table at ``root`` holding ``rowid``; None if not known."""
        tree = self.trees.get(root)
        if tree is None:
            return None
        page = root
        for _ in range(MAX_DEPTH):
            if page in tree.leafset:
                return page
            node = self._keys.get(page)
            if node is None:
                data = self._unread.pop(page, None)
                if data is None:
                    return None
                try:
                    below, keys = interior_links(data, page, self.usable)
                except CorruptData:
                    return None  # SQLite will say so when it reads the page
                node = self._keys[page] = (keys, below)
            keys, children = node
            page = children[bisect_left(keys, rowid)]
        return None

    def table_of(self, index_root: int) -> Tree | None:
        """The rowid table an index tree belongs to (None for a WITHOUT ROWID table's)."""
        tree = self.trees.get(index_root)
        if tree is None or tree.entry.type != "index":
            return None
        for t in self.trees.values():
            if t.entry.type == "table" and t.entry.name.lower() == tree.entry.table.lower():
                return t
        return None


def _no_peek(pageno: int) -> bytes | None:
    return None


FOLLOW_START = 32  # table leaves fetched ahead of an index walk at first
FOLLOW_MAX = 256
FOLLOW_PLACES = 3  # places in an index walk a missed table leaf may stand for
# Index leaves fetched along with a missed index leaf (its right siblings), so the table
# leaves of a range that spans several index leaves come in one batch: the count starts
# here, doubles while the siblings are read, halves to none while they are not (point
# lookups), and comes back when a scan walks from an index leaf into the next one.
SIBLINGS_START = 2
SIBLINGS_MAX = 16

RowidsOf = Callable[[int], tuple[list[int], Callable[[int], int | None]] | None]
# A table leaf missed whose rowid is not in the index leaf read last: SQLite may have
# gone on into the next local index leaves, read from memory; this many are looked at.
FIND_LEAVES = 2


def _no_rowids(leaf: int) -> None:
    return None


class IndexFollow:
    """SQLite reads an index leaf, then the table leaf of each rowid in it, in key order.

    When a table leaf misses right after an index leaf of that table was read, the
    leaves of the rowids that follow in the index leaf, and in the index leaves after
    it that are local (``siblings`` fetched them along with it), are fetched in the
    same request. How many follows the outcome: the count doubles while most of those
    leaves are read, and halves while most are not (point lookups by an index key).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.leaf: tuple[int, int] | None = None  # (lsn, index leaf page)
        self._rowids: list[int] | None = None  # the rowids of that leaf, in key order
        self._leaf_of: Callable[[int], int | None] | None = None
        self._more: RowidsOf = _no_rowids  # rowids_of, for the leaves of ``_chain``
        self._chain: list[int] = []  # local index leaves after the leaf, not read yet
        self._leaves: list[int | None] = []  # table leaf of each rowid, as far as known
        self._cursor = 0
        self.ahead = FOLLOW_START
        self._batch: set[int] = set()
        self._batch_used = 0
        # Right siblings of index leaves fetched along with them.
        self.siblings = SIBLINGS_START
        self._next: tuple[int, int] | None = None  # (lsn, the leaf after the last one read)
        self._sib_batch: set[int] = set()
        self._sib_used = 0

    def index_leaf(self, lsn: int, pageno: int, after: int | None = None) -> None:
        """An index leaf was read below the memory cache; ``after``: the leaf after it."""
        with self._lock:
            if self.leaf != (lsn, pageno):
                self.leaf, self._rowids, self._leaves, self._cursor = (lsn, pageno), None, [], 0
            if after is not None:
                self._next = (lsn, after)

    def read(self, pageno: int) -> None:
        """A page was read below the memory cache."""
        if pageno in self._batch:
            with self._lock:
                self._batch.discard(pageno)
                self._batch_used += 1
        if pageno in self._sib_batch:
            with self._lock:
                self._sib_batch.discard(pageno)
                self._sib_used += 1

    def sibling_count(self, lsn: int, pageno: int) -> int:
        """How many right siblings to fetch along with the missed index leaf ``pageno``."""
        with self._lock:
            sent = len(self._sib_batch) + self._sib_used
            if sent:
                if self._sib_used * 2 >= sent:
                    self.siblings = min(max(self.siblings, 1) * 2, SIBLINGS_MAX)
                elif self._sib_used * 4 < sent:
                    self.siblings //= 2
            if self._next == (lsn, pageno):  # a scan walked into the next leaf
                self.siblings = max(self.siblings, SIBLINGS_START)
            self._sib_batch, self._sib_used = set(), 0
            return self.siblings

    def siblings_fetched(self, pages: list[int]) -> None:
        with self._lock:
            self._sib_batch = set(pages)
            self._sib_used = 0

    def plan(
        self,
        lsn: int,
        pageno: int,
        rowids_of: RowidsOf,
        cap: int,
        chain: Callable[[int], list[int]] | None = None,
    ) -> list[int]:
        """Table leaves to fetch along with the missed ``pageno``.

        ``rowids_of(index_leaf)`` answers the rowids of that index leaf and a function
        giving the table leaf of a rowid (None if not known without the network), or
        None if the leaf is no index of a rowid table known locally. ``chain(leaf)``
        names the index leaves after it that are local, whose rowids follow its own.
        """
        with self._lock:
            if self.leaf is None or self.leaf[0] != lsn:
                return []
            if self._rowids is None:
                found = rowids_of(self.leaf[1])
                if found is None:
                    self.leaf = None
                    return []
                rowids, self._leaf_of = found
                self._rowids = list(rowids)
                # The local index leaves after it are read only as far as needed.
                self._more = rowids_of
                self._chain = list(chain(self.leaf[1])) if chain is not None else []
            # Many rowids share a table leaf: SQLite may be at any of the places whose
            # rowid is in ``pageno``; the leaves after each of the first few come along.
            places = self._find(pageno, self._cursor, len(self._rowids))
            if not places:
                places = self._find(pageno, 0, self._cursor)
            for _ in range(FIND_LEAVES):  # or SQLite went on into the next index leaf
                if places:
                    break
                known = len(self._rowids)
                if not self._extend():
                    break
                places = self._find(pageno, known, len(self._rowids))
            if not places:
                return []
            self._adapt()
            self._cursor = places[0]
            want = min(self.ahead, cap)
            out: list[int] = []
            for i in places:
                taken = 0
                j = i + 1
                while taken < want and (j < len(self._rowids) or self._extend()):
                    p = self._leaf(j)
                    j += 1
                    if p is not None and p != pageno:
                        taken += 1
                        if p not in out:
                            out.append(p)
            return out

    def _extend(self) -> bool:
        """Append the rowids of the next local index leaf; False if there is none."""
        while self._chain:
            more = self._more(self._chain.pop(0))
            if more is None:
                break
            if more[0]:
                self._rowids = (self._rowids or []) + more[0]
                return True
        self._chain = []
        return False

    def _find(self, pageno: int, start: int, stop: int) -> list[int]:
        """The first FOLLOW_PLACES places in ``[start, stop)`` whose rowid is in ``pageno``."""
        out = []
        for j in range(start, stop):
            if self._leaf(j) == pageno:
                out.append(j)
                if len(out) >= FOLLOW_PLACES:
                    break
        return out

    def _leaf(self, j: int) -> int | None:
        """The table leaf of the ``j``-th rowid, worked out once (the lock is held)."""
        leaves = self._leaves
        assert self._rowids is not None and self._leaf_of is not None
        while len(leaves) <= j:
            leaves.append(self._leaf_of(self._rowids[len(leaves)]))
        return leaves[j]

    def fetched(self, pages: list[int]) -> None:
        with self._lock:
            self._batch = set(pages)
            self._batch_used = 0

    def _adapt(self) -> None:
        sent = len(self._batch) + self._batch_used
        if not sent:
            return
        if self._batch_used * 2 >= sent:
            self.ahead = min(self.ahead * 2, FOLLOW_MAX)
        elif self._batch_used * 4 < sent:
            self.ahead = max(self.ahead // 2, 1)


# A background fetch of the B-tree being read starts after this many leaf misses in one
# tree within TREE_WINDOW seconds, and stops when no miss has come from that tree for
# TREE_WINDOW seconds while reads go elsewhere, or its budget runs out and stays out.
TREE_MISSES = 3
TREE_WINDOW = 2.0
# Background requests in flight together carry at most what the link moves in a quarter
# of a round trip, so a demand read sharing the link waits at most that long behind
# them: up to TREE_WORKERS requests of TREE_BATCH to TREE_BATCH_MAX pages (on a slow
# link, one of TREE_BATCH pages). LinkScheduler keeps one in flight while a demand read is.
TREE_INFLIGHT_RTTS = 0.25
# What is left of a tree the link moves in under TREE_CHEAP_RTTS round trips comes at
# once, in flight a whole round trip's worth (a demand read waits at most that long,
# for that short while).
TREE_CHEAP_INFLIGHT_RTTS = 1.0
TREE_BATCH = 16
TREE_BATCH_MAX = 512
TREE_WORKERS = 4
TREE_JOBS = 2  # trees fetched at once (an index and its table)
TREE_MIN_RTT = 0.010  # on a faster link the CPU a background fetch takes costs more
TREE_CHEAP_RTTS = 64  # what is left of a tree comes at once if it takes under 64 round trips
# Rounds that measure the link before a tree that is not cheap is given up (until the
# snapshot moves): fetched a quarter round trip at a time, it would take link time
# from demand reads for longer than most workloads stay in one tree.
TREE_PROBES = 3
# Until a round has measured the link, rounds of TREE_WORKERS parallel requests grow
# 4-fold from TREE_PROBE_FIRST pages (one a request: it opens their connections, each a
# round trip more, so its time is not compared) up to TREE_PROBE_MAX in all (5 MB).
TREE_PROBE_FIRST = TREE_WORKERS
TREE_PROBE_MAX = TREE_WORKERS * TREE_BATCH_MAX
# Options(background_fetch=None) runs it only where a round trip carries this many bytes
# at the rate background rounds measure (the bandwidth-delay product; edge: 20 ms at 100
# MB/s, 2 MB; slow: 50 ms at 2 MB/s, 100 KB): on a narrower link it would move many
# bytes for few round trips saved, and such links are often metered.
TREE_AUTO_BDP = 512 * 1024
# A tree given up, and the rate its rounds measured, hold this many seconds: then the
# next miss there tries again (the server may have warmed up, the link changed).
TREE_RETRY = 60.0
# Options(background_fetch=None), the default: on while the measured round trip is at
# least this long (an edge or a slow link), off below (a loopback, a LAN), where the
# client's CPU per fetched page costs more than the round trips it saves.
BACKGROUND_MIN_RTT = 0.015
# Background requests wait while small answers take this much longer than the floor.
CONGESTED_RATIO = 1.5
CONGESTED_SLACK = 0.005


class LinkScheduler:
    """Demand reads (SQLite waiting in xRead) first; background requests in what is left.

    A background request starts only while fewer than ``workers`` are in flight, and
    while a demand read is in flight, only if no other background request is: a demand
    read then shares the link with at most one background request, whose size
    (``tree_batch``) the link moves in a fraction of a round trip. None starts while
    ``congested()``: demand reads take clearly longer than the link's floor (a queue on
    the link or a busy or cold server, which background requests would only lengthen;
    as LEDBAT yields to other traffic).
    """

    def __init__(self, workers: int = TREE_WORKERS) -> None:
        self.workers = workers  # background requests in flight while no demand read is
        self._cond = threading.Condition()
        self.demand = 0  # demand reads in flight
        self.background = 0  # background requests in flight
        self.yielded = 0  # background requests that waited for demand reads
        self.congested: Callable[[], bool] = _never

    @contextmanager
    def demand_read(self) -> Iterator[None]:
        with self._cond:
            self.demand += 1
        try:
            yield
        finally:
            with self._cond:
                self.demand -= 1
                self._cond.notify_all()

    def _room(self) -> bool:
        return self.background < (1 if self.demand else self.workers) and not self.congested()

    def acquire(self, timeout: float) -> bool:
        """Wait for room for one background request; False if none came in ``timeout``."""
        with self._cond:
            if not self._room():
                self.yielded += 1
                if not self._cond.wait_for(self._room, timeout):
                    return False
            self.background += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.background -= 1
            self._cond.notify_all()

    @contextmanager
    def background_request(self, timeout: float) -> Iterator[bool]:
        """``with sched.background_request(t) as ok:`` send only if ``ok``."""
        ok = self.acquire(timeout)
        try:
            yield ok
        finally:
            if ok:
                self.release()


def _never() -> bool:
    return False


def congested(rtt: float, floor: float) -> bool:
    """Whether small answers take clearly longer than the link's floor: more than half
    again, and 5 ms more (a loopback's jitter)."""
    return rtt > floor * CONGESTED_RATIO + CONGESTED_SLACK


def background_on(setting: bool | None, floor: float) -> bool:
    """Whether the background fetch runs: as set, or (None) while the link's round-trip
    floor (``Link.floor``: a cold server's time does not count) is >= 15 ms."""
    return setting if setting is not None else floor >= BACKGROUND_MIN_RTT


class TreeWatch:
    """Leaf misses per B-tree in the last TREE_WINDOW seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._misses: dict[int, deque[float]] = {}

    def miss(self, root: int, now: float) -> int:
        """Record a leaf miss in the tree at ``root``; the misses there within the window."""
        with self._lock:
            times = self._misses.setdefault(root, deque())
            times.append(now)
            while times and times[0] < now - TREE_WINDOW:
                times.popleft()
            if len(self._misses) > 64:  # forget trees read long ago
                for r in [r for r, t in self._misses.items() if not t or t[-1] < now - TREE_WINDOW]:
                    del self._misses[r]
            return len(times)


def tree_budget(rtt: float) -> float:
    """Seconds of link time a background tree fetch may take per demand miss in that tree.

    One round trip: the fetch keeps the link busy at most as long as the workload has
    already waited on misses in the tree (a ski-rental bound), which at the measured
    bandwidth is a byte budget of misses x rtt x bandwidth; so the whole tree comes as
    soon as the workload has waited as long as fetching it takes. None on a link whose
    round trip is under TREE_MIN_RTT (a loopback, a LAN): there the client's CPU per
    fetched page, which a background fetch takes from the reads it would speed up,
    costs more than the round trips it saves.
    """
    return rtt if rtt >= TREE_MIN_RTT else 0.0


def tree_batch(
    rtt: float, bandwidth: float | None, page_bytes: float, rtts: float = TREE_INFLIGHT_RTTS
) -> tuple[int, int]:
    """Background requests in flight at once and pages in each: together what the link
    moves in ``rtts`` round trips (one of TREE_BATCH pages until a round has measured
    the bandwidth, or when that is less)."""
    if bandwidth is None:
        return 1, TREE_BATCH
    pages = rtt * rtts * bandwidth / page_bytes
    workers = int(min(TREE_WORKERS, max(1, pages // TREE_BATCH)))
    return workers, int(min(TREE_BATCH_MAX, max(TREE_BATCH, pages / workers)))


def tree_probe(pages: int) -> tuple[int, int]:
    """Requests and pages in each of a probing round of ``pages`` pages in all: always
    TREE_WORKERS requests, so after the first round none opens a connection."""
    return TREE_WORKERS, max(1, pages // TREE_WORKERS)


def tree_link_wide(rtt: float, bandwidth: float) -> bool:
    """Whether a round trip carries TREE_AUTO_BDP bytes at ``bandwidth``."""
    return rtt * bandwidth >= TREE_AUTO_BDP


def tree_is_cheap(nbytes: float, rtt: float, bandwidth: float) -> bool:
    """Whether fetching ``nbytes`` costs less link time than TREE_CHEAP_RTTS round trips:
    the rest of a tree that small is fetched at once, without waiting for more misses
    (a workload that has missed 3 times in a tree usually misses many more times)."""
    return nbytes <= TREE_CHEAP_RTTS * rtt * bandwidth
