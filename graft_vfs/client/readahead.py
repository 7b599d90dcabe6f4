"""Read-ahead for a sequential reader: the next window of pages is on the link while
SQLite works through the current one.

A demand fetch of a stride (``prefetch.Prefetcher``) brings the pages SQLite is about to
read; without more, the link then sits idle until SQLite misses again, and SQLite waits
a whole round trip and the server's time for every window. Here, once a stride has been
fetched, the window after it is fetched by a background thread at once. Its pages go
into the memory cache as they land, except its first page, kept aside as the window's
*mark* (as Linux marks a page of its read-ahead): SQLite's read of the mark misses the
memory cache, which is when the window after it starts. A scan thus keeps one window in
flight ahead of it, and the hot path (a memory-cache hit) does no work for it. A read of
a page whose window is still in flight waits for that window instead of asking again.

A window that lands after the snapshot moved caches nothing (its pages are stored in the
local store only, under the rows of the snapshot it was fetched for); a mark is served
only to a read of the snapshot it was fetched for. A window that fails is forgotten:
the demand path fetches its pages when SQLite reads them.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from graft_vfs.core.errors import GraftError

log = logging.getLogger("graft_vfs")

MAX_WINDOW = 256  # pages in one window (1 MiB), as the stride prefetch at most
DEPTH = 2  # windows in flight ahead of the reader
MARK_PAGES = 8  # a window's first pages fetched are its marks (SQLite may skip a few)
MAX_MARKS = 8 * MARK_PAGES  # marks kept (older ones belong to scans that stopped)
WAIT_SECONDS = 60.0  # a read waits at most this long for a window in flight

# (pages, lsn) -> the marks: (page, row_lsn, data) of the window's first MARK_PAGES
# fetched pages, none if nothing was fetched (every page was local, or the snapshot moved).
Fetch = Callable[[list[int], int], "list[tuple[int, int, bytes]]"]


@dataclass
class _Window:
    pages: list[int]
    lsn: int
    stride: int
    page_count: int
    done: threading.Event = field(default_factory=threading.Event)
    triggered: bool = False  # a mark was read: the window after it has started

    def __post_init__(self) -> None:
        self.members = set(self.pages)


@dataclass
class _Mark:
    row_lsn: int
    data: bytes
    window: _Window


class ReadAhead:
    """One volume's read-ahead windows in flight and their marks."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._flying: list[_Window] = []
        self._marks: OrderedDict[int, _Mark] = OrderedDict()
        self._front: _Window | None = None  # the window started last

    def start(self, last: int, stride: int, size: int, lsn: int, page_count: int) -> None:
        """Fetch, in the background, the DEPTH windows of ``size`` pages (doubling) that
        follow ``last`` by ``stride`` (the end of what a demand fetch just brought)."""
        for _ in range(DEPTH):
            window = self._launch(last, stride, size, lsn, page_count)
            if window is None:
                return
            last, size = window.pages[-1], size * 2

    def _launch(
        self, last: int, stride: int, size: int, lsn: int, page_count: int
    ) -> _Window | None:
        size = min(size, MAX_WINDOW)
        pages = [p for p in (last + stride * i for i in range(1, size + 1)) if 0 <= p < page_count]
        if not pages or stride == 0:
            return None
        window = _Window(pages, lsn, stride, page_count)
        with self._lock:
            if any(w.lsn == lsn and pages[0] in w.members for w in self._flying):
                return None  # already on its way
            self._flying.append(window)
            self._front = window
        threading.Thread(
            target=self._run, args=(window,), name="graft-read-ahead", daemon=True
        ).start()
        return window

    def _run(self, window: _Window) -> None:
        marks: list[tuple[int, int, bytes]] = []
        try:
            marks = self._fetch(window.pages, window.lsn)
        except GraftError as exc:  # read-ahead only ever saves reads
            log.debug("read-ahead of pages %d.. stopped: %s", window.pages[0] + 1, exc)
        finally:
            with self._lock:
                for page, row_lsn, data in marks:
                    self._marks[page] = _Mark(row_lsn, data, window)
                while len(self._marks) > MAX_MARKS:
                    self._marks.popitem(last=False)
                self._flying.remove(window)
            window.done.set()

    def busy(self) -> bool:
        """Whether any window is in flight or any mark is kept (read without the lock:
        a stale answer costs one lookup more or less)."""
        return bool(self._flying or self._marks)

    def wait(self, pageno: int, lsn: int) -> None:
        """If ``pageno`` is in a window in flight for snapshot ``lsn``, wait for it."""
        with self._lock:
            window = next((w for w in self._flying if w.lsn == lsn and pageno in w.members), None)
        if window is not None:
            window.done.wait(WAIT_SECONDS)

    def take_mark(self, pageno: int, lsn: int) -> tuple[int, bytes] | None:
        """The page if it is a window's mark for snapshot ``lsn``: ``(row_lsn, data)``;
        the first mark read of a window starts one after the last one started (DEPTH
        stay ahead of the reader)."""
        with self._lock:
            mark = self._marks.pop(pageno, None)
            front = self._front
            if mark is None or mark.window.lsn != lsn:
                return None
            w = mark.window
            first, w.triggered = not w.triggered, True
        if not first:
            return mark.row_lsn, mark.data
        if front is None or front.lsn != lsn or front.stride != w.stride:
            front = w
        self._launch(front.pages[-1], w.stride, len(front.pages) * 2, lsn, w.page_count)
        return mark.row_lsn, mark.data
