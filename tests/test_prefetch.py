"""Stride detection: sequential scans fetch ahead, random lookups fetch nothing extra."""

from __future__ import annotations

import random

from graft_vfs.prefetch import MAX_AHEAD, MIN_AHEAD, Prefetcher


def miss(p: Prefetcher, page: int) -> list[int]:
    p.record(page)
    return p.predict(page)


def test_sequential_scan_look_ahead_doubles_up_to_the_cap():
    p = Prefetcher()
    predictions = [miss(p, page) for page in range(10, 16)]
    assert predictions[:3] == [[], [], []]  # a stride must repeat before it counts
    assert predictions[3] == list(range(14, 14 + MIN_AHEAD))
    assert len(predictions[4]) == 2 * MIN_AHEAD
    sizes = [len(miss(p, page)) for page in range(16, 40)]
    assert max(sizes) == MAX_AHEAD


def test_backward_stride_is_followed():
    p = Prefetcher()
    for page in (100, 98, 96, 94):
        got = miss(p, page)
    assert got[:3] == [92, 90, 88]


def test_random_lookups_prefetch_nothing():
    p = Prefetcher()
    rng = random.Random(3)
    assert all(miss(p, rng.randrange(100_000)) == [] for _ in range(200))


def test_unused_prefetches_are_counted():
    p = Prefetcher()
    p.fetched([5, 6, 7])
    p.record(6)
    assert p.prefetched == 3 and p.used == 1 and p.unused == 2
