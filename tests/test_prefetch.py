"""Stride detection: sequential scans fetch ahead, random lookups fetch nothing extra."""

from __future__ import annotations

import random

from graft_vfs.client.prefetch import MAX_AHEAD, MIN_AHEAD, Prefetcher


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


def test_link_estimates():
    from graft_vfs.client.link import Link

    link = Link(rtt=0.01, bandwidth=1e6)
    for _ in range(50):
        link.observe(0.05, 1000)  # small answers: the round trip is 50 ms
    assert abs(link.rtt - 0.05) < 0.001
    for _ in range(50):
        link.observe(0.05 + 1.0, 10_000_000)  # 10 MB in one second after the RTT
    assert 8e6 < link.bandwidth < 12e6
    link.observe_pages(300_000, 100)
    assert 2048 < link.page_bytes < 3000


def test_frame_width_follows_density_and_the_link():
    from graft_vfs.client.prefetch import FrameSizer

    sparse, moderate, dense = FrameSizer(), FrameSizer(), FrameSizer()
    rng = random.Random(5)
    for _ in range(200):
        sparse.record(rng.randrange(1_000_000))  # lookups spread over a huge table
        moderate.record(rng.randrange(20_000))  # a quarter of 64-page frames touched twice
        dense.record(rng.randrange(1_000))  # lookups within a few frames
    edge = (0.020, 100e6, 1200)  # rtt, bandwidth, bytes per page
    slow = (0.050, 2e6, 1200)
    assert sparse.width(*edge) == 1 and sparse.width(*slow) == 1
    assert moderate.width(*edge) == 64  # a round trip costs more than 64 pages
    assert moderate.width(*slow) == 1  # on a slow link bytes cost time too
    assert dense.width(*slow) > 1
    assert FrameSizer().width(*edge) == 1  # nothing known yet: single pages
