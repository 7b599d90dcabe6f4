"""What the link to the server costs: round-trip time and bandwidth, measured as we go.

Every request's elapsed time and size feed two moving estimates: the round-trip time
(from small answers) and the bandwidth (from larger ones, after the round trip). The
fetch policy weighs a round trip against the bytes a wider fetch would move
(prefetch.FrameSizer).
"""

from __future__ import annotations

import threading
from collections import deque

ALPHA = 0.2  # weight of a new sample in the moving averages
SMALL = 16 * 1024  # answers up to this size measure the round trip
LARGE = 32 * 1024  # answers from this size measure the bandwidth
FLOOR_SAMPLES = 32  # the round trip's floor is the fastest of the last 32 small answers


class Link:
    """Moving estimates of round-trip time (seconds) and bandwidth (bytes/second)."""

    def __init__(
        self, rtt: float = 0.002, bandwidth: float = 10e6, page_bytes: float = 2048
    ) -> None:
        self.rtt = rtt
        # Until a large answer measures it, assume a modest link: wide fetches must
        # then prove themselves on savings in round trips, not on a guess.
        self.bandwidth = bandwidth
        self.page_bytes = page_bytes  # compressed page size on the wire
        self._lock = threading.Lock()
        self._small: deque[float] = deque(maxlen=FLOOR_SAMPLES)

    @property
    def floor(self) -> float:
        """The link's own round trip: the fastest recent small answer (the moving
        ``rtt`` includes the server's time, long while its cache is cold)."""
        small = self._small
        return min(small) if small else self.rtt

    def observe(self, seconds: float, nbytes: int) -> None:
        """One request took ``seconds`` and moved ``nbytes`` (both directions)."""
        with self._lock:
            if nbytes <= SMALL:
                self.rtt += ALPHA * (seconds - self.rtt)
                self._small.append(seconds)
            elif nbytes >= LARGE and seconds > self.rtt:
                rate = nbytes / (seconds - self.rtt)
                self.bandwidth += ALPHA * (rate - self.bandwidth)

    def observe_pages(self, nbytes: int, pages: int) -> None:
        """``pages`` pages arrived in ``nbytes`` of frames."""
        if pages:
            with self._lock:
                self.page_bytes += ALPHA * (nbytes / pages - self.page_bytes)
