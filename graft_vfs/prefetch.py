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
