"""The read path: heads, pulls, page reads at any retained LSN, and log entries.

Every answer comes from the index (refreshed from the store when it must say what the
latest is) and from segments, which are immutable: frames are fetched without holding
a volume's lock. Values arrive checked by the HTTP edge; what only the volume's state
can tell (an LSN beyond the latest, a page beyond the page count, an LSN below the GC
floor) is checked here.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

from pyroaring import BitMap

from graft_server.index import Index, VolumeLog, read_floor, read_record
from graft_server.segments import MissingSegment, SegmentCache, fetch_segments_frames
from graft_vfs.core.btree import (
    interior_children,
    is_interior,
    overflow_next,
    page_links,
    read_schema,
    usable_size,
)
from graft_vfs.core.checkpoint import Located
from graft_vfs.core.errors import (
    CorruptData,
    InvalidRequest,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    VolumeNotFound,
)
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.identity import Identity
from graft_vfs.core.segment import Entry, decompress_page


class Head(NamedTuple):
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


log = logging.getLogger("graft_server")

# What a first query reads before any row: SQLite loads these statistics with the schema.
STAT_TABLES = ("sqlite_stat1", "sqlite_stat4")
ZERO = bytes(4096)  # a page never written
MAX_OPENING = 1024  # pages an opening may carry (~4 MiB before compression)
OPENINGS_KEPT = 16  # openings kept in memory (one per volume and LSN)


class _OutOfBudget(Exception):
    """The opening's page budget ran out: send what was gathered."""


class Reads:
    """Answers about the volumes of one index. Thread-safe.

    ``cache`` (optional) keeps recently read page frames in memory, bounded in bytes.
    """

    def __init__(self, index: Index, cache: SegmentCache | None = None) -> None:
        self.index = index
        self.store = index.store
        self.cache = cache
        # Openings already built, by (volume, its identity, LSN, budget): immutable,
        # and every cold client of a volume asks for the same one.
        self._openings: OrderedDict[tuple[str, bytes, int, int], list[PageFrame]] = OrderedDict()
        self._openings_lock = threading.Lock()

    def list_volumes(self, allowed: Callable[[str], bool] | None = None) -> list[Head | Unreadable]:
        """The head of every volume in the store that ``allowed`` accepts, by name.

        Volumes outside ``allowed`` are never loaded. A volume that cannot be read
        (CorruptData) is listed as Unreadable instead of failing the whole listing.
        """
        listed: list[Head | Unreadable] = []
        for vid in self.index.list_vids():
            if allowed is not None and not allowed(vid):
                continue
            try:
                listed.append(self.head(vid))
            except VolumeNotFound:
                continue  # its log went away after the listing
            except CorruptData as exc:
                listed.append(Unreadable(vid, "corrupt_data", str(exc)))
        return listed

    def head(self, vid: str) -> Head:
        """The latest LSN and page count. Raises VolumeNotFound if the volume has no commit."""
        vol = self.index.volume(vid)
        with vol.lock:
            latest = self.index.latest(vol)
            return Head(vol.vid, latest, vol.page_count_at(latest))

    def opening(self, vid: str, budget: int) -> tuple[Head, list[PageFrame]]:
        """The head, and up to ``budget`` pages of it that any first query reads.

        Before its first row, a connection reads page 1, the whole schema B-tree and
        the statistics tables (SQLite loads them with the schema), then the root and
        the interior levels of each B-tree it queries. Sent with the head, they cost
        the cold client no round trip of its own: an index query then needs one for
        its index leaves and one for its table leaves. In order: page 1, the schema
        tree (with its overflow pages), the statistics trees, every other root, then
        interior levels below the roots, highest first. Pages are read level by level
        (one batch of store reads per level). A damaged page ends the opening early:
        it is an optimisation, and reading the page later reports the damage.
        """
        head = self.head(vid)
        if budget <= 0 or head.page_count == 0:
            return head, []
        key = (vid, self.index.identity(vid).volume_id, head.lsn, budget)
        with self._openings_lock:
            frames = self._openings.get(key)
            if frames is not None:
                self._openings.move_to_end(key)
                return head, frames
        frames, whole = self._opening(head, budget)
        if whole:  # one cut short by a store failure is not kept: the next client asks again
            with self._openings_lock:
                self._openings[key] = frames
                while len(self._openings) > OPENINGS_KEPT:
                    self._openings.popitem(last=False)
        return head, frames

    def _opening(self, head: Head, budget: int) -> tuple[list[PageFrame], bool]:
        """The opening's frames, and False if a store failure cut it short."""
        vol = self.index.volume(head.vid)
        view = self._view(vol, head.lsn, None)
        gathered: dict[int, PageFrame] = {}
        contents: dict[int, bytes] = {}

        def take(pages: list[int]) -> list[int]:
            """Read ``pages`` (those not taken yet) into the opening; the pages read.
            Takes what fits, then raises _OutOfBudget if that was not all."""
            pages = [p for p in dict.fromkeys(pages) if p not in gathered and p < head.page_count]
            fits = pages[: budget - len(gathered)]
            for page, frame in self._frames(view, head.lsn, fits, known).items():
                gathered[page] = frame
                contents[page] = decompress_page(frame.frame, page) if frame.frame else ZERO
            if len(fits) < len(pages):
                raise _OutOfBudget
            return fits

        def read(page: int) -> bytes:
            if page not in contents:
                if page >= head.page_count:
                    raise CorruptData(f"page {page + 1} is beyond the page count")
                take([page])
            return contents[page]

        def whole_trees(roots: list[int], usable: int) -> None:
            """Every page of the trees of ``roots``, level by level, the trees together."""
            level = take(roots)
            while level:
                below: list[int] = []
                for page in level:
                    children, chains = page_links(contents[page], page, usable)
                    below += children
                    for first, _ in chains:
                        nxt: int | None = first
                        while nxt is not None and nxt not in contents:
                            nxt = overflow_next(read(nxt), nxt, head.page_count)
                level = take(below)

        try:
            known = self._home_of_page_1(view, head.lsn, budget)
            take([0])
            usable = usable_size(contents[0])
            whole_trees([0], usable)
            schema = read_schema(read, head.page_count)
            stats = [e.root for e in schema if e.name in STAT_TABLES]
            others = [e.root for e in schema if e.name not in STAT_TABLES]
            left = budget - len(gathered)
            self._read_ahead(view, head.lsn, head.page_count, stats, others, gathered, known, left)
            whole_trees(stats, usable)
            roots = take([e.root for e in schema if e.root not in gathered])
            for root in roots:  # one tree at a time: _interior_below probes one depth
                left = budget - len(gathered)
                below = {root: gathered[root]}
                found = self._interior_below(view, head.lsn, head.page_count, below, left, known)
                for frame in found:
                    gathered.setdefault(frame.page, frame)
        except (_OutOfBudget, CorruptData):
            pass
        except (StorageError, MissingSegment) as exc:
            # An optimisation must not fail the open: the client reads these pages
            # itself, and the read path says what is wrong with the store.
            log.info("opening of %r cut short: %s", head.vid, exc)
            return list(gathered.values()), False
        return list(gathered.values()), True

    def _read_ahead(
        self,
        view: VolumeLog,
        lsn: int,
        page_count: int,
        whole: list[int],
        probed: list[int],
        gathered: Mapping[int, PageFrame],
        known: dict[int, PageFrame],
        limit: int,
    ) -> None:
        """Read into ``known`` what the opening reads next one tree and one level at a
        time, for all trees at once, one batch of store reads per depth: the roots not
        read yet, every page of the ``whole`` trees (the statistics), and below the
        ``probed`` roots the pages _interior_below probes (the first child of the first
        page of each level). After a cold server loaded the benchmark volume, 8 of its
        17 store reads one after another were these (the stat1 root, stat4's leaves, a
        probe per tree: leaves all, as the interior pages came with page 1's segment);
        now they are one round. At most ``limit`` pages in all."""

        def frame_of(page: int) -> PageFrame | None:
            return known.get(page) or gathered.get(page)

        def children(page: int, frame: PageFrame) -> list[int]:
            if not frame.frame:
                return []
            content = decompress_page(frame.frame, page)  # [] below for any other page
            return [c for c in interior_children(content, page) if c < page_count]

        while limit > 0:
            wanted: dict[int, None] = {}
            seen: set[int] = set()  # a damaged tree may point back up
            level = list(whole)
            while level:
                below = []
                for page in level:
                    if page not in seen:
                        seen.add(page)
                        frame = frame_of(page)
                        if frame is None:
                            wanted[page] = None
                        else:
                            below += children(page, frame)
                level = below
            for page in probed:
                seen.clear()
                while page not in seen:
                    seen.add(page)
                    frame = frame_of(page)
                    if frame is None:
                        wanted[page] = None
                        break
                    kids = children(page, frame)
                    if not kids:
                        break
                    page = kids[0]
            batch = list(wanted)[:limit]
            if not batch:
                return
            known.update(self._frames(view, lsn, batch))
            limit -= len(batch)

    def _home_of_page_1(self, view: VolumeLog, lsn: int, budget: int) -> dict[int, PageFrame]:
        """The current pages of the segment that holds page 1, read in one ranged read if
        there are at most ``budget``: a large commit lays page 1 and every interior
        B-tree page in segments of their own (``core.segment.upper_first``), so this is
        most of an opening in one store read. Which pages those are, the page map says
        (reading the segment's index first cost two more round trips)."""
        with view.lock:
            home = view.locate(0, lsn)
            if home is None:
                return {}
            current = view.located_in(home.sid, lsn)
        if len(current) > budget:
            return {}
        frames = fetch_segments_frames(
            self.store, {home.sid: [loc.entry for loc in current.values()]}, self.cache
        )
        return {
            page: PageFrame(page, loc.version, loc.entry.crc, frames[page])
            for page, loc in current.items()
        }

    def pull(self, vid: str, since: int) -> Pull:
        """The latest snapshot and the pages changed in ``(since, latest]`` that still exist."""
        vol = self.index.volume(vid)
        with vol.lock:
            latest = self.index.latest(vol)
            if since > latest:
                raise SnapshotNotFound(f"LSN {since} is beyond the latest LSN {latest} of {vid!r}")
            # A page changed in (since, latest] exactly when its latest version is
            # newer than since (since may be older than the loaded checkpoint).
            graft = vol.changed_since(since)
            page_count = vol.page_count_at(latest)
        # Pages past the current end were truncated away: nothing to fetch for them.
        graft.remove_range(page_count, MAX_PAGES)
        return Pull(latest, page_count, graft)

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

        Raises InvalidRequest for a page at or beyond the page count at ``lsn``;
        SnapshotNotFound if ``lsn`` is beyond the latest; SnapshotExpired if GC removed
        it; CorruptData if a stored frame fails its checksum; IdentityMismatch if the
        volume is not ``expected``.
        """
        vol = self.index.volume(vid)
        try:
            return self._read(vol, lsn, pages, expand, expected)
        except MissingSegment:
            # GC may have compacted the pages into new segments (and deleted the old
            # ones after its grace period): reload the map once and retry.
            if lsn < read_floor(self.store, vid):
                raise SnapshotExpired(
                    f"LSN {lsn} of {vid!r} is older than its retained history; "
                    "pull a newer snapshot"
                ) from None
            self.index.unload(vol)
            return self._read(vol, lsn, pages, expand, expected)

    def locate(
        self, vid: str, lsn: int, pages: BitMap, expected: Identity | None = None
    ) -> tuple[int, list[tuple[int, Located | None]]]:
        """Where each page as of ``lsn`` lives (None: never written), for direct reads.

        Pages at or beyond the page count at ``lsn`` are left out (a client may ask for
        a whole range); returns that page count too. Raises as ``read`` does, but reads
        no segment: it answers from the page map alone.
        """
        vol = self.index.volume(vid)
        view = self._view(vol, lsn, expected)
        page_count = view.page_count_at(lsn)
        pages = BitMap(pages)
        pages.remove_range(page_count, MAX_PAGES)
        with view.lock:
            return page_count, [(page, view.locate(page, lsn)) for page in pages]

    def _view(self, vol: VolumeLog, lsn: int, expected: Identity | None) -> VolumeLog:
        """The page map that answers for ``lsn`` (the volume's, or a history view), after
        checking that ``lsn`` exists and is retained and the volume is ``expected``."""
        with vol.lock:
            self.index.ensure_lsn(vol, lsn)
            self.index.check_identity(vol, expected)
            self.index.check_retained(vol, lsn)
            return vol if lsn >= vol.base else self.index.history(vol, lsn)

    def log_entry(self, vid: str, lsn: int) -> LogEntry:
        """The record of commit ``lsn``: lets a client that crashed mid-push check it landed."""
        vol = self.index.volume(vid)
        with vol.lock:
            self.index.ensure_lsn(vol, lsn)
            if lsn == 0:
                raise SnapshotNotFound("LSN 0 is the empty volume: it has no log record")
            self.index.check_retained(vol, lsn)
            if lsn > vol.base:
                commit = vol.commit_at(lsn)
                return LogEntry(lsn, commit.page_count, commit.hash)
        record = read_record(self.store, vid, lsn)
        if record is None:
            raise SnapshotExpired(f"LSN {lsn} of {vid!r} is older than its retained history")
        return LogEntry(lsn, record.page_count, record.hash)

    def _read(
        self, vol: VolumeLog, lsn: int, pages: BitMap, expand: int, expected: Identity | None
    ) -> list[PageFrame]:
        view = self._view(vol, lsn, expected)
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

    def _frames(
        self,
        view: VolumeLog,
        lsn: int,
        pages: Iterable[int],
        known: Mapping[int, PageFrame] | None = None,
    ) -> dict[int, PageFrame]:
        """Each page's frame as of ``lsn`` (an empty frame for a page never written);
        those in ``known`` (frames of ``lsn`` read already) are not read again."""
        located: dict[int, Located] = {}
        result: dict[int, PageFrame] = {}
        if known:
            pages = list(pages)
            result = {p: known[p] for p in pages if p in known}
            pages = [p for p in pages if p not in result]
        with view.lock:
            for page in pages:
                loc = view.locate(page, lsn)
                if loc is not None:
                    located[page] = loc
        # Segments are immutable, so frames are fetched without holding the lock.
        by_segment: dict[str, list[Entry]] = defaultdict(list)
        for loc in located.values():
            by_segment[loc.sid].append(loc.entry)
        frames = fetch_segments_frames(self.store, by_segment, self.cache)
        for page in pages:
            loc = located.get(page)
            if loc is not None:
                result[page] = PageFrame(page, loc.version, loc.entry.crc, frames[page])
            else:
                result[page] = PageFrame(page, 0, 0, b"")
        return result

    def _interior_below(
        self,
        view: VolumeLog,
        lsn: int,
        page_count: int,
        requested: dict[int, PageFrame],
        budget: int,
        known: Mapping[int, PageFrame] | None = None,
    ) -> list[PageFrame]:
        """Interior B-tree pages under the requested interior pages, level by level.

        A lookup that reads a B-tree's root will read one page of every interior
        level below it; sending the levels along (up to ``budget`` pages, highest
        levels first) turns one round trip per level into one per tree. B-trees are
        balanced, so one probe per level tells whether that level is still interior;
        the probe of the next level (the first child of this level's first page) is
        read with this level's pages, so a level costs one round of store reads.
        """
        seen = set(requested)
        parsed: dict[int, list[int]] = {}

        def children(parents: list[tuple[int, bytes]]) -> Iterator[int]:
            """The next level's pages in order, each parent parsed when first reached:
            the probe needs only the first, and the level above the leaves is most
            of a tree's interior pages (parsing them all cost ~20 ms of a cold
            opening's CPU on the benchmark volume, to learn that their children are
            leaves)."""
            for page, content in parents:
                if page not in parsed:
                    parsed[page] = interior_children(content, page)
                for child in parsed[page]:
                    if child < page_count and child not in seen:
                        yield child

        parents = [
            (page, decompress_page(frame.frame, page))
            for page, frame in requested.items()
            if frame.frame
        ]
        extra: list[PageFrame] = []
        probe: PageFrame | None = None  # the first page of the next level, when already read
        while budget > 0:
            first = next(children(parents), None)
            if first is None:
                break
            if probe is None or probe.page != first:
                probe = self._frames(view, lsn, [first], known)[first]
            if not probe.frame:
                break
            content = decompress_page(probe.frame, probe.page)
            if not is_interior(content, probe.page):
                break
            batch = list(dict.fromkeys(children(parents)))[:budget]
            budget -= len(batch)
            seen.update(batch)
            parsed[probe.page] = interior_children(content, probe.page)
            ahead = [
                p for p in parsed[probe.page][:1] if budget > 0 and p < page_count and p not in seen
            ]
            frames = self._frames(view, lsn, [p for p in batch[1:] + ahead], known)
            frames[probe.page] = probe
            probe = frames[ahead[0]] if ahead else None
            parents = []
            for page in batch:
                frame = frames[page]
                if frame.frame:
                    extra.append(frame)
                    parents.append((page, decompress_page(frame.frame, page)))
        return extra
