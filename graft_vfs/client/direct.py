"""Direct reads: page frames fetched straight from the object store with presigned URLs.

A server on S3 offers them (``"direct": true`` in its snapshot and pull answers). The
client then asks it where pages live (``POST /v1/volumes/{vid}/locate``: per page the
segment, offset, length, crc and version; per segment a presigned GET URL) and GETs the
frames itself: adjacent frames of one segment in one ranged GET, several ranges in
parallel over pooled keep-alive connections. The server reads nothing from the store
for it, so a cold server costs a cold read one request to the server per snapshot
(often none) instead of one per page and a store read behind each.

Locations are kept in memory per (volume, identity, LSN). The first locate of a
snapshot covers its first ``LOCATE_FIRST`` pages (opening a volume reads page 0 and the
schema: a few KB of locations); the next covers the rest of a small snapshot
(``LOCATE_ALL`` pages, about 15 bytes a page) or the aligned ``LOCATE_CHUNK``-page
blocks around the pages missing, so most reads need no server hop at all. A location is valid for a
later snapshot exactly when its page did not change in between: a pull from the map's
LSN (whose graft names every page changed) or a commit on top of it carries the map
forward without the changed pages; any other LSN starts a map of its own.

Every frame is verified as the server path does (crc bound to its page number, the
zstd size checks) before it is returned. A URL the store refuses (403: expired,
revoked, clock skew) makes the client ask for fresh locations once; a second refusal
is a RemoteError that says how to turn direct reads off. A segment gone from the store
(GC compacted it) sends the pages through the server instead, which knows the new map.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import urllib3
from pyroaring import BitMap
from urllib3.util.retry import Retry

from graft_vfs.client.link import Link
from graft_vfs.core.btree import interior_children, is_interior
from graft_vfs.core.envelope import check_int
from graft_vfs.core.errors import CorruptData, GraftError, InvalidRequest, RemoteError
from graft_vfs.core.graft import MAX_PAGES, decode_graft, encode_graft
from graft_vfs.core.identity import Identity
from graft_vfs.core.ids import MAX_LSN
from graft_vfs.core.pages import ZERO_PAGE
from graft_vfs.core.protocol import MAX_LOCATE_PAGES
from graft_vfs.core.segment import Entry, coalesce_runs, decode_page

# The first locate of a snapshot asks for its first pages (and what it misses)...
LOCATE_FIRST = 256
# ... the next one, for the whole snapshot if it has at most this many pages.
LOCATE_ALL = MAX_LOCATE_PAGES
# Past it, a read locates the aligned blocks of this many pages around what it misses.
LOCATE_CHUNK = 4096
# Frames closer than this in one segment come in one ranged GET: a request costs far
# more than 64 KiB of transfer on any link the object store is reached over. On a link
# whose round trip carries more (``gap_for``), the gap grows with it, up to MAX_GAP.
COALESCE_GAP = 64 * 1024
MAX_GAP = 2 * 1024 * 1024
PARALLEL_GETS = 16  # an expanded B-tree level can be 30+ scattered pages: one wave
# Interior pages below requested ones (``expand``) are found by the client, level by
# level, from frames it GETs (measured faster than asking the server for them).
MAPS_PER_VOLUME = 4  # snapshots whose locations are kept (open readers may pin old ones)
EXPIRY_MARGIN = 0.8  # a map is dropped at this fraction of its URLs' validity
NEVER_WRITTEN = -1
_U32 = (1 << 32) - 1
_MAX_OFFSET = (1 << 63) - 1


def direct_enabled() -> bool:
    """Direct reads are used when a server offers them, unless ``GRAFT_DIRECT=0``."""
    return os.environ.get("GRAFT_DIRECT", "1").strip().lower() not in ("0", "off", "no", "false")


# Where one page of a snapshot lives: (segment index or -1 if never written, version,
# offset, length, crc). A plain tuple: a map may hold one per page of a large volume.
Location = tuple[int, int, int, int, int]


@dataclass
class LocationMap:
    """The locations known for one snapshot of one volume, and the URLs they need."""

    lsn: int
    page_count: int
    deadline: float  # time.monotonic() after which the URLs are not trusted
    urls: list[str] = field(default_factory=list)  # by segment index
    sids: dict[str, int] = field(default_factory=dict)
    pages: dict[int, Location] = field(default_factory=dict)
    covered: BitMap = field(default_factory=BitMap)

    def fresh(self) -> bool:
        return time.monotonic() < self.deadline

    def advanced(self, lsn: int, page_count: int, changed: BitMap) -> LocationMap:
        """This map carried to ``lsn``: the pages in ``changed`` (and past the end) dropped."""
        covered = self.covered - changed
        covered.remove_range(page_count, MAX_PAGES)
        pages = {p: loc for p, loc in self.pages.items() if p in covered}
        return LocationMap(lsn, page_count, self.deadline, self.urls, self.sids, pages, covered)


class Refused(Exception):
    """The object store refused a presigned URL (403)."""


class Missing(Exception):
    """A segment a location names is not in the object store (404)."""


Locate = Callable[[str, dict[str, Any], Any], dict[str, Any]]
Count = Callable[[float, int], None]


class DirectReader:
    """Direct reads for one server: ``locate`` calls its locate route. Thread-safe."""

    def __init__(
        self,
        locate: Locate,
        server: str,
        *,
        timeout: float = 30.0,
        observe: Count | None = None,
        link: Link | None = None,
    ) -> None:
        self._locate_call = locate
        self.server = server
        self._observe = observe  # (seconds, bytes) of each GET, for the link estimates
        self._link = link  # its round trip and bandwidth size the coalescing gap
        self._maps: dict[tuple[str, Identity | None], OrderedDict[int, LocationMap]] = {}
        self._lock = threading.Lock()
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=PARALLEL_GETS,
            retries=Retry(
                total=3,
                backoff_factor=0.1,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,
                raise_on_status=False,
            ),
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
        )
        self._pool = ThreadPoolExecutor(PARALLEL_GETS, thread_name_prefix="graft-direct")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.clear()

    # -- the location maps -------------------------------------------------------------

    def _map(self, vid: str, identity: Identity | None, lsn: int) -> LocationMap | None:
        with self._lock:
            maps = self._maps.get((vid, identity))
            m = maps.get(lsn) if maps else None
            if m is not None and not m.fresh():
                del maps[lsn]  # type: ignore[union-attr]
                return None
            return m

    def _keep(self, vid: str, identity: Identity | None, m: LocationMap) -> None:
        with self._lock:
            maps = self._maps.setdefault((vid, identity), OrderedDict())
            maps[m.lsn] = m
            maps.move_to_end(m.lsn)
            while len(maps) > MAPS_PER_VOLUME:
                maps.popitem(last=False)

    def forget(self, vid: str) -> None:
        """Drop every location of ``vid`` (refused URLs, a segment gone)."""
        with self._lock:
            for key in [k for k in self._maps if k[0] == vid]:
                del self._maps[key]

    def advanced(
        self,
        vid: str,
        identity: Identity | None,
        since: int,
        lsn: int,
        page_count: int,
        changed: BitMap,
    ) -> None:
        """The volume moved from ``since`` to ``lsn`` changing exactly ``changed`` (a pull's
        graft, a commit's pages): carry the map of ``since`` forward, if there is one."""
        if lsn == since:
            return
        old = self._map(vid, identity, since)
        if old is not None and self._map(vid, identity, lsn) is None:
            self._keep(vid, identity, old.advanced(lsn, page_count, changed))

    # -- locating ------------------------------------------------------------------

    def _ask(
        self, vid: str, lsn: int, pages: BitMap, identity: Identity | None, traffic: Any
    ) -> LocationMap:
        """One locate request; its answer checked field by field."""
        body: dict[str, Any] = {"lsn": lsn, "pages": encode_graft(pages)}
        if identity is not None:
            body.update(store_id=identity.store_id, volume_id=identity.volume_id)
        asked = time.monotonic()
        d = self._locate_call(vid, body, traffic)
        what = f"a locate of {vid!r} at LSN {lsn}"

        def bad(why: str) -> CorruptData:
            return CorruptData(
                f"graft server {self.server} sent an invalid answer to {what}: " + why
            )

        if not isinstance(d, dict):
            raise bad("not a map")
        if check_int(d.get("lsn"), 0, MAX_LSN, bad) != lsn:
            raise bad("another LSN")
        page_count = check_int(d.get("page_count"), 0, MAX_PAGES - 1, bad)
        expires = check_int(d.get("expires_in"), 1, 7 * 24 * 3600, bad)
        try:
            located = decode_graft(d.get("pages"))
        except (GraftError, ValueError) as exc:
            raise bad(str(exc)) from None
        expected = BitMap(pages)
        expected.remove_range(page_count, MAX_PAGES)
        if located != expected:
            raise bad("it locates other pages than those asked for")
        segments, cols = d.get("segments"), d.get("cols")
        if not (isinstance(segments, list) and isinstance(cols, list) and len(cols) == 5):
            raise bad("no segments or columns")
        if not all(isinstance(c, list) and len(c) == len(located) for c in cols):
            raise bad("columns of the wrong length")
        urls: list[str] = []
        sids: dict[str, int] = {}
        for item in segments:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and item[1].startswith(("http://", "https://"))
            ):
                raise bad("a segment is not [id, URL]")
            sids[item[0]] = len(urls)
            urls.append(item[1])
        m = LocationMap(lsn, page_count, asked + expires * EXPIRY_MARGIN, urls, sids)
        # Checked a column at a time: an answer may hold a row per page of the volume.
        for col, name, low, high in zip(
            cols,
            ("segment", "version", "offset", "length", "crc"),
            (NEVER_WRITTEN, 0, 0, 0, 0),
            (len(urls) - 1, lsn, _MAX_OFFSET, _MAX_OFFSET, _U32),
        ):
            if not set(map(type, col)) <= {int} or (col and (min(col) < low or max(col) > high)):
                raise bad(f"a {name} is not an integer in [{low}, {high}]")
        segs, versions, lengths = cols[0], cols[1], cols[3]
        if any(
            (seg == NEVER_WRITTEN) != (n == 0) or (seg == NEVER_WRITTEN) != (v == 0)
            for seg, v, n in zip(segs, versions, lengths)
        ):
            raise bad("a page has a segment without a frame or a version")
        m.pages = dict(zip(located, zip(*cols)))
        m.covered = located
        return m

    def _locations(
        self,
        vid: str,
        lsn: int,
        wanted: BitMap,
        identity: Identity | None,
        traffic: Any,
    ) -> LocationMap:
        """A map of snapshot ``lsn`` covering ``wanted`` (asking the server if need be)."""
        m = self._map(vid, identity, lsn)
        need = wanted if m is None else wanted - m.covered
        if not need:
            assert m is not None
            return m
        ask = BitMap()
        if m is None:
            # The first read of a snapshot (opening it: page 0 and the schema) moves a
            # few KB of locations, not a map of the whole volume.
            ask.add_range(0, LOCATE_FIRST)
        elif m.page_count <= LOCATE_ALL:
            ask.add_range(0, m.page_count)  # the rest of a small snapshot, at once
        else:
            for page in need:
                start = page - page % LOCATE_CHUNK
                if start not in ask:
                    ask.add_range(start, start + LOCATE_CHUNK)
                if len(ask) >= MAX_LOCATE_PAGES:
                    break
        if m is not None:
            ask -= m.covered
        ask |= need  # always what is missing, whatever the blocks
        fresh: LocationMap | None = None
        ordered = list(ask)
        for i in range(0, len(ordered), MAX_LOCATE_PAGES):
            got = self._ask(vid, lsn, BitMap(ordered[i : i + MAX_LOCATE_PAGES]), identity, traffic)
            fresh = got if fresh is None else _merged(fresh, got)
        assert fresh is not None
        if m is not None and m.fresh():
            fresh = _merged(m, fresh)
        self._keep(vid, identity, fresh)
        return fresh

    # -- reading ---------------------------------------------------------------------

    def read(
        self,
        vid: str,
        lsn: int,
        wanted: BitMap,
        traffic: Any,
        *,
        expand: int = 0,
        identity: Identity | None = None,
    ) -> dict[int, tuple[int, bytes]]:
        """Pages as of ``lsn``: ``{page: (version, 4096 bytes)}``, each verified.

        With ``expand``, interior B-tree pages below the requested interior pages are
        added, level by level (up to ``expand`` pages), as the server would.
        Raises Refused (twice refused) or Missing for the caller to fall back.
        """
        try:
            return self._read(vid, lsn, wanted, traffic, expand, identity)
        except Refused:
            self.forget(vid)  # expired or revoked URLs: fresh ones, once
        try:
            return self._read(vid, lsn, wanted, traffic, expand, identity)
        except Refused:
            self.forget(vid)
            raise RemoteError(
                f"the object store refused the presigned URLs graft server {self.server} "
                "gave for direct reads (403, twice): check that the server's clock is right "
                "and its --direct-endpoint is the address clients reach the store at, or "
                "turn direct reads off (graft server --no-direct, or GRAFT_DIRECT=0 here)"
            ) from None

    def _read(
        self,
        vid: str,
        lsn: int,
        wanted: BitMap,
        traffic: Any,
        expand: int,
        identity: Identity | None,
    ) -> dict[int, tuple[int, bytes]]:
        m = self._locations(vid, lsn, wanted, identity, traffic)
        out = self._fetch(m, wanted, traffic)
        if expand:
            self._expand(vid, lsn, m, out, expand, traffic, identity)
        return out

    def _expand(
        self,
        vid: str,
        lsn: int,
        m: LocationMap,
        out: dict[int, tuple[int, bytes]],
        budget: int,
        traffic: Any,
        identity: Identity | None,
    ) -> None:
        """Interior pages below the interior pages in ``out``, a level per round trip.

        The same pages as the server's expansion (server/reads.py): B-trees are
        balanced, so one probe per level tells whether it is still interior (a leaf
        level is never fetched whole); the probe of a level travels with the level above.
        """
        level: list[int] = []
        for page, (_, data) in sorted(out.items()):
            level += interior_children(data, page)
        probe: dict[int, tuple[int, bytes]] = {}
        while budget > 0:
            level = [p for p in dict.fromkeys(level) if p < m.page_count and p not in out]
            if not level:
                return
            first = level[0]
            if first not in probe:  # not fetched along with the level above
                m = self._locations(vid, lsn, BitMap([first]), identity, traffic)
                probe = self._fetch(m, BitMap([first]), traffic)
            if not is_interior(probe[first][1], first):
                return
            batch = level[:budget]
            budget -= len(batch)
            # The next level starts with the first child of ``first``: it comes in the
            # same round as this level, so a level costs one round trip, not two.
            ahead = interior_children(probe[first][1], first)[:1] if budget > 0 else []
            ahead = [p for p in ahead if p < m.page_count and p not in out and p not in batch]
            want = BitMap(batch[1:]) | BitMap(ahead)
            m = self._locations(vid, lsn, want, identity, traffic)
            got = {**probe, **self._fetch(m, want, traffic)}
            level = []
            for page in batch:
                out[page] = got[page]
                level += interior_children(got[page][1], page)
            probe = {p: got[p] for p in ahead}

    def _fetch(self, m: LocationMap, pages: BitMap, traffic: Any) -> dict[int, tuple[int, bytes]]:
        """The frames of ``pages`` (all located in ``m``), verified, with parallel GETs."""
        out: dict[int, tuple[int, bytes]] = {}
        by_segment: dict[int, list[Entry]] = {}
        versions: dict[int, int] = {}
        for page in pages:
            seg, version, offset, length, crc = m.pages[page]
            if seg == NEVER_WRITTEN:
                out[page] = (0, ZERO_PAGE)
                continue
            versions[page] = version
            by_segment.setdefault(seg, []).append(Entry(page, offset, length, crc))
        gap = gap_for(self._link)
        runs = [
            (m.urls[seg], run)
            for seg, entries in by_segment.items()
            for run in coalesce_runs(entries, gap)
        ]
        if len(runs) == 1:
            results = [self._get(*runs[0])]
        else:
            results = list(self._pool.map(lambda r: self._get(*r), runs))
        for (_, run), (data, seconds) in zip(runs, results):
            start = run[0].offset
            if traffic is not None:
                traffic.requests += 1
                traffic.bytes_received += len(data)
            if self._observe is not None:
                self._observe(seconds, len(data))
            for e in run:
                frame = data[e.offset - start : e.offset - start + e.length]
                out[e.page] = (versions[e.page], decode_page(e, frame))
        return out

    def _get(self, url: str, run: list[Entry]) -> tuple[bytes, float]:
        """One ranged GET of a run of frames: its bytes, exactly as long as the run."""
        start = run[0].offset
        end = max(e.offset + e.length for e in run)
        began = time.perf_counter()
        try:
            resp = self._http.request(
                "GET", url, headers={"Range": f"bytes={start}-{end - 1}"}, preload_content=False
            )
            # Never more than the run (or, from a store that ignores ranges and sends the
            # whole object, than the run's end): the rest is not read, and a connection
            # with bytes left unread is closed, not reused.
            body = resp.read(end if resp.status == 200 else max(end - start, 200))
            if resp.read(1):
                resp.close()
            else:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            raise RemoteError(f"object store unreachable for a direct read: {exc}") from exc
        if resp.status == 403:
            raise Refused()
        if resp.status == 404:
            raise Missing()
        if resp.status == 200:  # the whole object: a store that ignores ranges
            data = body[start:end]
        elif resp.status == 206:
            data = body
        else:
            raise RemoteError(
                f"object store answered {resp.status} to a direct read: "
                f"{body[:200].decode('utf-8', 'replace')}"
            )
        if len(data) != end - start:
            raise CorruptData(
                f"a direct read got {len(data)} bytes of a segment, expected {end - start}"
            )
        return data, time.perf_counter() - began


def gap_for(link: Link | None) -> int:
    """The largest gap between two frames of one segment still read in one GET: the bytes
    half a round trip moves (a second GET costs a round trip; the gap's bytes, their
    transfer), at least COALESCE_GAP and at most MAX_GAP."""
    if link is None:
        return COALESCE_GAP
    return int(min(MAX_GAP, max(COALESCE_GAP, link.rtt * link.bandwidth / 2)))


def _merged(a: LocationMap, b: LocationMap) -> LocationMap:
    """``b``'s locations added to ``a``'s (same snapshot), with both sets of URLs."""
    if a.lsn != b.lsn or a.page_count != b.page_count:
        raise InvalidRequest("location maps of different snapshots cannot be merged")
    urls, sids = list(a.urls), dict(a.sids)
    renumber = {}
    for sid, i in b.sids.items():
        if sid not in sids:
            sids[sid] = len(urls)
            urls.append(b.urls[i])
        renumber[i] = sids[sid]
    pages = dict(a.pages)
    for page, loc in b.pages.items():
        seg = loc[0] if loc[0] == NEVER_WRITTEN else renumber[loc[0]]
        pages[page] = (seg, *loc[1:])
    deadline = min(a.deadline, b.deadline)
    return LocationMap(a.lsn, a.page_count, deadline, urls, sids, pages, a.covered | b.covered)
