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


def test_link_estimates_and_free_pages():
    from graft_vfs.link import Link

    fast = Link(rtt=0.0005, bandwidth=1e9, page_bytes=2000)
    assert fast.free_pages(64) == 64  # 0.5 ms x 1 GB/s carries 250 pages
    slow = Link(rtt=0.05, bandwidth=2e6, page_bytes=2000)
    assert slow.free_pages(16) == 16 and slow.free_pages(64) == 50
    tiny = Link(rtt=0.0001, bandwidth=1e6, page_bytes=2000)
    assert tiny.free_pages(64) == 1
    link = Link(rtt=0.01, bandwidth=1e6)
    for _ in range(50):
        link.observe(0.05, 1000)  # small answers: the round trip is 50 ms
    assert abs(link.rtt - 0.05) < 0.001
    for _ in range(50):
        link.observe(0.05 + 1.0, 10_000_000)  # 10 MB in one second after the RTT
    assert 8e6 < link.bandwidth < 12e6
    link.observe_pages(300_000, 100)
    assert 2048 < link.page_bytes < 3000
