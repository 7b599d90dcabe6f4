"""A volume's counters, reported by ``PRAGMA graft_stats``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

from graft_vfs.client.remote import Traffic


@dataclass
class Stats:
    """Counters of one volume in this process; ``add`` may be called from any thread."""

    pages_fetched: int = 0
    bytes_fetched: int = 0
    requests: int = 0
    cache_hits: int = 0  # pages served from memory
    local_hits: int = 0  # pages served from the local store on disk
    local_reads: int = 0  # queries of the local store for pages (a run of pages is one)
    cache_misses: int = 0  # pages that had to come from the server
    pages_prefetched: int = 0  # fetched ahead of a read, along with a missed page
    prefetch_unused: int = 0  # prefetched pages not read (yet)
    readahead_windows: int = 0  # windows a sequential reader had fetched ahead of it
    commits_local: int = 0
    commits_pushed: int = 0
    pages_pushed: int = 0
    bytes_pushed: int = 0
    commits_pulled: int = 0
    pushes_rejected: int = 0  # pushes the server refused as based on an old snapshot
    rebases: int = 0  # rejected pushes rebased onto the new head and sent again
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}

    def add(self, **counts: int) -> None:
        """Add to counters, e.g. ``add(pages_fetched=3)``; safe from pool threads."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def count(self, traffic: Traffic, *, push: bool = False) -> None:
        """Add what ``traffic`` moved: bytes sent for a push, else bytes received."""
        if push:
            self.add(requests=traffic.requests, bytes_pushed=traffic.bytes_sent)
        else:
            self.add(requests=traffic.requests, bytes_fetched=traffic.bytes_received)
