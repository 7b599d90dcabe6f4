"""Checkpoints, O(1) bootstrap, the segment cache, compaction and garbage collection."""

from __future__ import annotations

import random
import time

import pytest
from pyroaring import BitMap

from graft_server.gc import Retention, collect
from graft_server.keys import log_key
from graft_server.objstore import MemoryStore
from graft_server.segments import SegmentCache
from graft_server.volumes import Volumes
from graft_vfs.core.errors import CommitConflict, SnapshotExpired
from graft_vfs.core.ids import PAGE_SIZE
from support.commits import commit, contents, page, random_page


def churn(vols: Volumes, vid: str, commits: int, pages: int = 8, seed: int = 0) -> None:
    """A volume of ``pages`` pages, then ``commits`` commits rewriting one or two pages."""
    rng = random.Random(seed)
    lsn = commit(vols, vid, 0, pages, {p: random_page(p) for p in range(pages)})
    for i in range(commits - 1):
        changed = {rng.randrange(pages): random_page(1000 + i)}
        lsn = commit(vols, vid, lsn, pages, changed)


def stored_bytes(store: MemoryStore) -> int:
    return sum(len(store.get(k) or b"") for k in store.list(""))


def first_query_cost(store: MemoryStore, vid: str) -> int:
    """Object-store requests a cold server makes to answer a snapshot and a page read."""
    before = sum(store.stats.values())
    cold = Volumes(store)
    snap = cold.reads.head(vid)
    cold.reads.read(vid, snap.lsn, BitMap([0]))
    return sum(store.stats.values()) - before


def test_bootstrap_cost_does_not_grow_with_history():
    store = MemoryStore()
    vols = Volumes(store)
    churn(vols, "short", 10)
    churn(vols, "long", 2000)
    short, long = first_query_cost(store, "short"), first_query_cost(store, "long")
    assert long <= 3 * short + 10, (short, long)
    assert long < 60


def test_cold_server_reads_every_lsn_through_checkpoints():
    store = MemoryStore()
    vols = Volumes(store, checkpoint_every=4)
    churn(vols, "v", 30, pages=5)
    expected = {lsn: contents(vols, "v", lsn) for lsn in range(1, 31)}
    cold = Volumes(store, checkpoint_every=4)
    for lsn in (30, 17, 3, 1, 29):  # older than the loaded checkpoint too
        assert contents(cold, "v", lsn) == expected[lsn]
    # every commit writes new content, so "written since" is "differs from the LSN before"
    for since in (2, 25):  # older and newer than the loaded checkpoint
        written = BitMap(
            p
            for p in range(5)
            if any(expected[lsn][p] != expected[lsn - 1][p] for lsn in range(since + 1, 31))
        )
        assert cold.reads.pull("v", since).graft == written


def test_segment_cache_limit_holds_and_saves_reads():
    store = MemoryStore()
    cache = SegmentCache(max_bytes=20_000)
    vols = Volumes(store, cache=cache)
    incompressible = {p: random.Random(p).randbytes(PAGE_SIZE) for p in range(64)}
    commit(vols, "v", 0, 64, incompressible)
    for p in range(64):
        vols.reads.read("v", 1, BitMap([p]))
        assert cache.bytes <= cache.max_bytes
    assert 0 < len(cache) < 64
    gets = store.stats["range_gets"]
    vols.reads.read("v", 1, BitMap([63]))  # recently read: served from memory
    assert store.stats["range_gets"] == gets and cache.hits == 1


def test_gc_shrinks_storage_and_keeps_retained_lsns_identical():
    store = MemoryStore()
    vols = Volumes(store)
    churn(vols, "v", 120, pages=16)
    before = stored_bytes(store)
    keep = {lsn: contents(vols, "v", lsn) for lsn in range(111, 121)}
    report = collect(vols, Retention(lsns=10), grace=0)
    assert report.floors == {"v": 111} and report.segments_deleted > 100
    after = stored_bytes(store)
    assert after < before / 3, (before, after)
    for reader in (vols, Volumes(store)):  # the GC's own process and a cold one
        for lsn, pages in keep.items():
            assert contents(reader, "v", lsn) == pages
        with pytest.raises(SnapshotExpired):
            contents(reader, "v", 50)
    assert collect(vols, Retention(lsns=10), grace=0).segments_deleted == 0  # idempotent


def test_gc_waits_out_the_grace_period_and_never_breaks_an_old_reader():
    store = MemoryStore()
    vols = Volumes(store)
    churn(vols, "v", 40, pages=6)
    old = contents(vols, "v", 5)
    # A server that loaded the page map of LSN 5 before GC ran, and so trusts the floor
    # it read then (for FLOOR_RECHECK seconds) while GC deletes that LSN's segments.
    # It caches no frames, so that every read after GC needs the segments.
    stale = Volumes(store, cache=SegmentCache(max_bytes=0))
    assert contents(stale, "v", 5) == old
    first = collect(vols, Retention(lsns=3), grace=60, now=1000.0)
    assert first.segments_deleted == 0 and first.segments_pending > 0
    # Within the grace period it still serves the old data (the records are gone already).
    assert contents(stale, "v", 5, count=6) == old
    assert contents(vols, "v", 40)  # still served after the first pass
    second = collect(vols, Retention(lsns=3), grace=60, now=1061.0)
    assert second.segments_deleted == first.segments_pending
    # Its map names segments that are gone: "expired", never a wrong or empty page.
    with pytest.raises(SnapshotExpired, match="older than its retained history"):
        stale.reads.read("v", 5, BitMap(range(6)))


def test_gc_keeps_everything_without_retention():
    store = MemoryStore()
    vols = Volumes(store)
    churn(vols, "v", 30, pages=4)
    full = {lsn: contents(vols, "v", lsn) for lsn in range(1, 31)}
    report = collect(vols, Retention(), grace=0)
    assert report.records_deleted == 0 and report.segments_deleted == 0
    cold = Volumes(store)
    for lsn, pages in full.items():
        assert contents(cold, "v", lsn) == pages


def test_time_retention_sees_history_older_than_the_loaded_checkpoint():
    store = MemoryStore()
    vols = Volumes(store, checkpoint_every=4)
    churn(vols, "v", 20, pages=4)  # all committed just now
    cold = Volumes(store, checkpoint_every=4)  # starts from the checkpoint at LSN 20
    cold.reads.head("v")
    report = collect(cold, Retention(seconds=3600), grace=0)
    assert report.records_deleted == 0 and report.floors == {}
    later = collect(cold, Retention(seconds=3600), grace=0, now=time.time() + 7200)
    assert later.floors == {"v": 20}  # an hour later only the latest stays readable



def test_servers_gc_left_behind_see_the_latest_and_refuse_a_stale_commit():
    """Servers whose caches stopped at LSN 1 while others committed and GC deleted the
    records after it: a pull sees the latest, and a commit on LSN 1 is a conflict, never
    a record written into the hole GC left (an acknowledged commit no one would see)."""
    store = MemoryStore()
    reader, writer, ahead = Volumes(store), Volumes(store), Volumes(store)
    commit(ahead, "v", 0, 2, {0: page(1), 1: page(2)})
    assert reader.reads.head("v").lsn == writer.reads.head("v").lsn == 1
    assert contents(writer, "v", 1) == [page(1), page(2)]  # (its floor read: 0, cached)
    for lsn in (1, 2):
        commit(ahead, "v", lsn, 2, {0: page(10 + lsn)})
    assert collect(Volumes(store), Retention(lsns=1), grace=0).floors["v"] == 3
    assert store.get(log_key("v", 2)) is None  # the record after their latest: deleted

    assert reader.reads.head("v").lsn == 3
    assert contents(reader, "v", 3) == [page(12), page(2)]
    with pytest.raises(CommitConflict) as conflict:
        commit(writer, "v", 1, 2, {1: page(99)})
    assert conflict.value.latest_lsn == 3
    for vols in (Volumes(store), writer, ahead):
        assert vols.reads.head("v").lsn == 3
        assert contents(vols, "v", 3) == [page(12), page(2)]
    assert commit(writer, "v", 3, 2, {1: page(99)}) == 4
