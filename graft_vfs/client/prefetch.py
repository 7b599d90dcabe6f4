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
from collections import Counter, deque

WINDOW = 8  # recent accesses the vote looks at
MIN_VOTES = 3  # a stride must repeat this often before anything is prefetched
MIN_AHEAD = 8
MAX_AHEAD = 256  # 1 MiB of pages per request at most


class Prefetcher:
    """Predicts the pages worth fetching along with a missed page."""

    def __init__(self, window: int = WINDOW, max_ahead: int = MAX_AHEAD) -> None:
        self.max_ahead = max_ahead
        self._history: deque[int] = deque(maxlen=window + 1)
        self._ahead = 0
        self._stride = 0
        self._outstanding: set[int] = set()  # prefetched and not read yet
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
            h = list(self._history)
            deltas = [b - a for a, b in zip(h, h[1:])]
            if not deltas:
                return []
            stride, votes = Counter(deltas).most_common(1)[0]
            if stride == 0 or votes < MIN_VOTES or votes * 2 <= len(deltas):
                self._ahead = 0
                return []
            if stride == self._stride and self._ahead:
                self._ahead = min(self._ahead * 2, self.max_ahead)
            else:
                self._stride, self._ahead = stride, MIN_AHEAD
            return [pageno + stride * i for i in range(1, self._ahead + 1)]

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
