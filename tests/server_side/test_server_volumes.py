"""Volumes on a MemoryStore: the commit path, pulls, reads at past LSNs, and their rules."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pytest
import zstandard
from pyroaring import BitMap

from graft_server import commits as commits_module
from graft_server.app import parse_commit, parse_pages
from graft_server.keys import log_key
from graft_server.objstore import MemoryStore
from graft_server.reads import Head
from graft_server.segments import upload_segment
from graft_server.volumes import Volumes
from graft_vfs.core.commit import CommitRecord, SegmentRef, commit_hash
from graft_vfs.core.errors import (
    CommitConflict,
    CorruptData,
    InvalidRequest,
    InvalidVolumeId,
    SnapshotNotFound,
    VolumeNotFound,
)
from graft_vfs.core.graft import MAX_PAGES_PER_READ
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.segment import encode_segment, frame_crc
from support.commits import commit, page


def read(vols: Volumes, vid: str, lsn: int, pages: Iterable[int]) -> dict[int, tuple[int, bytes]]:
    """page -> (version_lsn, uncompressed bytes)."""
    dctx = zstandard.ZstdDecompressor()
    return {
        f.page: (f.version_lsn, dctx.decompress(f.frame) if f.frame else bytes(PAGE_SIZE))
        for f in vols.reads.read(vid, lsn, BitMap(pages))
    }


def log_records(store: MemoryStore, vid: str) -> list[str]:
    return store.list(f"volumes/{vid}/log/")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def vols(store: MemoryStore) -> Volumes:
    return Volumes(store)


def test_unknown_volume(vols: Volumes) -> None:
    with pytest.raises(VolumeNotFound):
        vols.reads.head("v")
    with pytest.raises(VolumeNotFound):
        vols.reads.pull("v", 0)
    with pytest.raises(VolumeNotFound):
        vols.reads.read("v", 0, BitMap())
    with pytest.raises(VolumeNotFound):
        vols.reads.log_entry("v", 1)
    with pytest.raises(InvalidVolumeId):
        vols.reads.head("../etc")


def test_commit_then_read_at_past_lsns(vols: Volumes, store: MemoryStore) -> None:
    assert commit(vols, "v", 0, 3, {0: page(1), 1: page(1), 2: page(1)}) == 1
    assert commit(vols, "v", 1, 3, {1: page(2)}) == 2
    assert vols.reads.head("v") == Head("v", 2, 3)
    assert read(vols, "v", 1, [0, 1, 2]) == {0: (1, page(1)), 1: (1, page(1)), 2: (1, page(1))}
    assert read(vols, "v", 2, [0, 1, 2]) == {0: (1, page(1)), 1: (2, page(2)), 2: (1, page(1))}
    assert vols.reads.read("v", 0, BitMap()) == []
    assert log_records(store, "v") == [log_key("v", 1), log_key("v", 2)]
    with pytest.raises(SnapshotNotFound):
        vols.reads.read("v", 3, BitMap([0]))


def test_read_crc_matches_frame_and_limits(vols: Volumes) -> None:
    commit(vols, "v", 0, 2, {0: page(7), 1: page(8)})
    frames = vols.reads.read("v", 1, BitMap([0, 1]))
    assert all(f.crc == frame_crc(f.page, f.frame) for f in frames)
    with pytest.raises(InvalidRequest, match="beyond the page count"):
        vols.reads.read("v", 1, BitMap([2]))
    with pytest.raises(InvalidRequest, match="at most"):  # refused at the HTTP edge
        parse_pages(BitMap(range(MAX_PAGES_PER_READ + 1)).serialize())


def test_pull_returns_pages_changed_since(vols: Volumes) -> None:
    commit(vols, "v", 0, 3, {0: page(1), 1: page(1), 2: page(1)})
    commit(vols, "v", 1, 3, {1: page(2)})
    commit(vols, "v", 2, 3, {2: page(3)})
    assert vols.reads.pull("v", 0) == (3, 3, BitMap([0, 1, 2]))
    assert vols.reads.pull("v", 1) == (3, 3, BitMap([1, 2]))
    assert vols.reads.pull("v", 3) == (3, 3, BitMap())
    with pytest.raises(SnapshotNotFound):
        vols.reads.pull("v", 4)


def test_conflict_reports_latest_and_writes_no_record(vols: Volumes, store: MemoryStore) -> None:
    commit(vols, "v", 0, 1, {0: page(1)})
    commit(vols, "v", 1, 1, {0: page(2)})
    for base in (1, 0, 7):
        with pytest.raises(CommitConflict) as info:
            commit(vols, "v", base, 1, {0: page(9)})
        assert info.value.latest_lsn == 2
    assert len(log_records(store, "v")) == 2
    with pytest.raises(VolumeNotFound):  # no LSN 3 to build on in a volume that does not exist
        commit(vols, "w", 3, 1, {0: page(1)})


def test_retry_of_a_landed_commit_succeeds_once(vols: Volumes, store: MemoryStore) -> None:
    assert commit(vols, "v", 0, 1, {0: page(1)}) == 1
    assert commit(vols, "v", 0, 1, {0: page(1)}) == 1
    commit(vols, "v", 1, 1, {0: page(2)})
    assert commit(vols, "v", 0, 1, {0: page(1)}) == 1  # still recognised later
    assert len(log_records(store, "v")) == 2
    entry = vols.reads.log_entry("v", 1)
    assert (entry.lsn, entry.page_count) == (1, 1)
    assert entry.hash == commit_hash("v", 0, 1, [(0, page(1))])


def test_growing_commit_must_write_every_new_page(vols: Volumes) -> None:
    with pytest.raises(InvalidRequest, match="every new page"):
        commit(vols, "v", 0, 2, {1: page(1)})
    commit(vols, "v", 0, 2, {0: page(1), 1: page(1)})
    with pytest.raises(InvalidRequest, match="every new page"):
        commit(vols, "v", 1, 5, {0: page(2), 2: page(2), 4: page(2)})
    with pytest.raises(InvalidRequest, match="beyond the page count"):
        commit(vols, "v", 1, 2, {2: page(2)})
    assert commit(vols, "v", 1, 4, {2: page(2), 3: page(2)}) == 2


def test_truncate_then_regrow(vols: Volumes) -> None:
    commit(vols, "v", 0, 3, {0: page(1), 1: page(1), 2: page(1)})
    assert commit(vols, "v", 1, 1, {}) == 2  # truncation only: no segment
    assert vols.reads.head("v").page_count == 1
    assert vols.reads.pull("v", 0) == (2, 1, BitMap([0]))  # truncated pages are not in the graft
    with pytest.raises(InvalidRequest):
        vols.reads.read("v", 2, BitMap([2]))
    assert read(vols, "v", 1, [2]) == {2: (1, page(1))}  # the past keeps its pages
    with pytest.raises(InvalidRequest, match="every new page"):
        commit(vols, "v", 2, 3, {2: page(3)})
    commit(vols, "v", 2, 3, {1: page(3), 2: page(3)})
    assert read(vols, "v", 3, [0, 1, 2]) == {0: (1, page(1)), 1: (3, page(3)), 2: (3, page(3))}


def test_never_written_page_reads_as_empty_frame(vols: Volumes, store: MemoryStore) -> None:
    # The growth rule keeps clients from making holes, but a log record may still
    # describe a sparse volume (written by an importer, say): holes read as zeros.
    data, entries = encode_segment([(1, page(5))])
    sid = upload_segment(store, data)
    record = CommitRecord("v", bytes(16), 1, 3, bytes(32), 0.0, [SegmentRef(sid, entries)])
    store.put_if_absent(log_key("v", 1), record.encode())
    frames = vols.reads.read("v", 1, BitMap([0, 1, 2]))
    assert [(f.page, f.version_lsn, f.crc, f.frame) for f in frames if f.page != 1] == [
        (0, 0, 0, b""),
        (2, 0, 0, b""),
    ]
    assert read(vols, "v", 1, [1]) == {1: (1, page(5))}


def test_two_volumes_objects_on_one_store_see_each_other(store: MemoryStore) -> None:
    a, b = Volumes(store), Volumes(store)
    commit(a, "v", 0, 1, {0: page(1)})
    assert b.reads.head("v") == Head("v", 1, 1)
    assert commit(b, "v", 1, 1, {0: page(2)}) == 2
    assert a.reads.pull("v", 1) == (2, 1, BitMap([0]))
    assert read(a, "v", 2, [0]) == {0: (2, page(2))}
    with pytest.raises(CommitConflict) as info:
        commit(a, "v", 1, 1, {0: page(3)})
    assert info.value.latest_lsn == 2
    assert [s.vid for s in b.reads.list_volumes()] == ["v"]


def test_concurrent_commits_on_one_base_have_one_winner(vols: Volumes) -> None:
    commit(vols, "v", 0, 1, {0: page(0)})
    barrier = threading.Barrier(8)
    outcomes: list[int | str] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(commit(vols, "v", 1, 1, {0: page(i + 1)}))
        except CommitConflict as exc:
            outcomes.append(f"conflict@{exc.latest_lsn}")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [2] + ["conflict@2"] * 7


def test_commit_with_uploaded_segments(vols: Volumes, store: MemoryStore) -> None:
    first = upload_segment(store, encode_segment([(0, page(1)), (1, page(1))])[0])
    second = upload_segment(store, encode_segment([(2, page(2))])[0])
    pages = [(0, page(1)), (1, page(1)), (2, page(2))]
    digest = commit_hash("v", 0, 3, pages)
    assert vols.commits.commit("v", 0, 3, digest, sids=[first, second]) == 1
    assert read(vols, "v", 1, [0, 2]) == {0: (1, page(1)), 2: (1, page(2))}
    with pytest.raises(InvalidRequest, match="never uploaded"):
        vols.commits.commit("v", 1, 3, digest, sids=["0" * 32])
    with pytest.raises(InvalidRequest, match="two segments"):
        overlapping = encode_segment([(2, page(3))])[0]
        vols.commits.commit("v", 1, 3, digest, segment=overlapping, sids=[second])
    with pytest.raises(InvalidRequest, match="named twice"):  # refused at the HTTP edge
        parse_commit({"base": 1, "page_count": 3, "hash": digest, "segments": [first, first]})


@pytest.mark.parametrize(
    "field, value",
    [
        ("base", -1),
        ("base", True),
        ("base", "0"),
        ("page_count", 1 << 31),
        ("page_count", 1.0),
        ("hash", b"short"),
        ("hash", "x" * 32),
        ("segment", "not bytes"),
        ("segment", b"not a segment"),
        ("segments", "not a list"),
        ("segments", ["../../etc/passwd"]),
    ],
)
def test_malformed_commits_are_refused(
    vols: Volumes, store: MemoryStore, field: str, value: object
) -> None:
    """Through the HTTP edge's parser, then the commit: one of them refuses it."""
    body: dict[str, object] = {"base": 0, "page_count": 1, "hash": bytes(32)}
    body["segment"] = encode_segment([(0, page(1))])[0]
    body[field] = value
    with pytest.raises(InvalidRequest):
        checked = parse_commit(body)
        vols.commits.commit(
            "v",
            checked.base,
            checked.page_count,
            checked.hash,
            segment=checked.segment,
            sids=checked.sids,
        )
    assert store.list("") == []


def test_corrupt_frame_is_never_served(vols: Volumes, store: MemoryStore) -> None:
    commit(vols, "v", 0, 1, {0: page(1)})
    (key,) = store.list("segments/")
    data = store.get(key)
    assert data is not None
    store.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptData):
        vols.reads.read("v", 1, BitMap([0]))


def test_corrupt_log_is_reported(store: MemoryStore) -> None:
    store.put(log_key("v", 1), b"not msgpack")
    with pytest.raises(CorruptData):
        Volumes(store).reads.head("v")
    store.delete(log_key("v", 1))
    store.put(log_key("v", 2), b"")  # a gap: LSN 1 missing
    with pytest.raises(CorruptData, match="gap"):
        Volumes(store).reads.head("v")


@pytest.mark.parametrize("point", ["server.commit.after_segment", "server.commit.after_log"])
def test_crash_points_leave_nothing_or_a_complete_commit(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    class Crash(Exception):
        pass

    def crash_at(name: str) -> None:
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(commits_module, "crash_point", crash_at)
    with pytest.raises(Crash):
        commit(Volumes(store), "v", 0, 1, {0: page(1)})
    monkeypatch.undo()

    # A fresh server process on the same store.
    fresh = Volumes(store)
    if point == "server.commit.after_segment":
        with pytest.raises(VolumeNotFound):
            fresh.reads.head("v")
    else:
        assert fresh.reads.head("v") == Head("v", 1, 1)
    assert commit(fresh, "v", 0, 1, {0: page(1)}) == 1  # the client's retry
    assert read(fresh, "v", 1, [0]) == {0: (1, page(1))}
    assert len(log_records(store, "v")) == 1


def test_read_expand_sends_interior_pages_below_an_interior_page(tmp_path):
    import apsw

    from graft_vfs.core.btree import is_interior

    path = str(tmp_path / "deep.db")
    con = apsw.Connection(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    with con:
        con.executemany("INSERT INTO t VALUES(?, ?)", ((i, "y" * 1000) for i in range(60_000)))
    (root,) = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 't'").fetchone()
    con.close()
    data = open(path, "rb").read()
    pages = {i // PAGE_SIZE: data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)}
    interior = {p for p, d in pages.items() if is_interior(d, p)}
    assert len(interior) > 2  # a tree with more than one interior level
    vols = Volumes(MemoryStore())
    commit(vols, "v", 0, len(pages), pages)
    plain = vols.reads.read("v", 1, BitMap([root - 1]))
    assert [f.page for f in plain] == [root - 1]
    rounds: list[list[int]] = []  # each call: one round of (parallel) store reads
    frames = vols.reads._frames

    def counted(view, lsn, pages, known=None):  # type: ignore[no-untyped-def]
        rounds.append(list(pages))
        return frames(view, lsn, pages, known)

    vols.reads._frames = counted  # type: ignore[method-assign]
    expanded = vols.reads.read("v", 1, BitMap([root - 1]), expand=1024)
    assert {f.page for f in expanded} == interior  # every interior page, no leaf
    # the root; the probe of the level below; that level with the next level's probe,
    # a leaf: the end. Without reading ahead, that leaf would be a fourth round.
    assert len(rounds) == 3, rounds
    del vols.reads._frames
    capped = vols.reads.read("v", 1, BitMap([root - 1]), expand=1)
    assert len(capped) == 2
    leaf = min(set(pages) - interior - {0})
    assert [f.page for f in vols.reads.read("v", 1, BitMap([leaf]), expand=64)] == [leaf]


def test_names_that_have_no_volume_leave_nothing_loaded(vols: Volumes) -> None:
    commit(vols, "v", 0, 1, {0: page(1)})
    for i in range(2000):
        with pytest.raises(VolumeNotFound):
            vols.reads.head(f"missing-{i}")
        with pytest.raises(VolumeNotFound):
            vols.reads.pull(f"missing-{i}", 0)
        with pytest.raises(VolumeNotFound):
            vols.reads.read(f"missing-{i}", 1, BitMap([0]))
    assert vols.index.loaded_volumes() == 1
    assert vols.reads.head("v") == Head("v", 1, 1)


def test_loaded_volumes_are_bounded_least_recently_used_first(store: MemoryStore) -> None:
    vols = Volumes(store, max_loaded=3)
    for i in range(10):
        commit(vols, f"v{i}", 0, 1, {0: page(i)})
        assert vols.index.loaded_volumes() <= 3
    assert vols.index.loaded_volumes() == 3
    assert read(vols, "v9", 1, [0]) == {0: (1, page(9))}  # (reads its GC floor once)
    gets = store.stats["gets"]
    assert read(vols, "v9", 1, [0]) == {0: (1, page(9))}  # still loaded: no log read
    assert store.stats["gets"] == gets
    assert read(vols, "v0", 1, [0]) == {0: (1, page(0))}  # dropped: its log is read again
    assert store.stats["gets"] > gets
    for i in range(10):  # dropped ones are read again from the store
        assert read(vols, f"v{i}", 1, [0]) == {0: (1, page(i))}
        assert vols.reads.head(f"v{i}") == Head(f"v{i}", 1, 1)
    assert vols.index.loaded_volumes() == 3
    assert [s.vid for s in vols.reads.list_volumes()] == [f"v{i}" for i in range(10)]
    assert vols.index.loaded_volumes() == 3


def test_listing_reports_a_damaged_volume_and_loads_none_it_does_not_list(
    vols: Volumes, store: MemoryStore
) -> None:
    for vid in ("a", "b", "c"):
        commit(vols, vid, 0, 1, {0: page(1)})
    store.put(log_key("b", 1), b"garbage")
    fresh = Volumes(store)
    listed = fresh.reads.list_volumes()
    assert listed[0] == Head("a", 1, 1) and listed[2] == Head("c", 1, 1)
    assert (listed[1].vid, listed[1].error) == ("b", "corrupt_data")
    gets = store.stats["gets"]
    assert fresh.reads.list_volumes(lambda vid: vid == "c") == [Head("c", 1, 1)]
    # c: the probe for a newer LSN and, finding none, the GC floor; b is never read
    assert store.stats["gets"] - gets == 2
