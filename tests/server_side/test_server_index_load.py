"""A cold server's volume load: one checkpoint, then the log records after it read in
parallel, every one verified; checkpoints written by commits; crashes and damage.

Runs on a directory store and on S3 (a real SeaweedFS), through a wrapper that
counts, damages or hides objects the way a faulty store or a racing GC would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard
from pyroaring import BitMap

from graft_server import index as index_module
from graft_server.keys import checkpoint_key, checkpoint_prefix, log_key
from graft_server.objstore import FsStore, ObjectStore
from graft_server.reads import Head
from graft_server.volumes import Volumes
from graft_vfs.core.errors import CorruptData, StorageError
from graft_vfs.core.ids import PAGE_SIZE
from support.commits import commit, random_page

PAGES = 6


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "s3":
        return request.getfixturevalue("seaweed").store()
    return FsStore(tmp_path / "store")


class Watched:
    """``store`` with its gets counted (and how many ran at once), some keys hidden from
    gets (as if deleted after a listing), and checkpoint puts failing while ``refuse``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.gets: list[str] = []
        self.hidden: set[str] = set()
        self.refuse_checkpoints = 0
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self.gets.append(key)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.01)  # a store round trip: lets parallel reads overlap
            return None if key in self.hidden else self.store.get(key)
        finally:
            with self._lock:
                self.in_flight -= 1

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("volumes/") and "/checkpoints/" in key and self.refuse_checkpoints:
            self.refuse_checkpoints -= 1
            raise StorageError(f"refused put of {key}")
        self.store.put(key, data)


def history(vols: Volumes, vid: str, commits: int, start: int = 0) -> dict[int, list[bytes]]:
    """Commit ``commits`` times (each rewrites one page); every LSN's pages."""
    lsn = start
    if not lsn:
        lsn = commit(vols, vid, 0, PAGES, {p: random_page(p) for p in range(PAGES)})
        commits -= 1
    for i in range(commits):
        lsn = commit(vols, vid, lsn, PAGES, {(lsn * 7) % PAGES: random_page(1000 + lsn + i)})
    return {n: contents(vols, vid, n) for n in range(max(1, lsn - 12), lsn + 1)}


def contents(vols: Volumes, vid: str, lsn: int) -> list[bytes]:
    dctx = zstandard.ZstdDecompressor()
    frames = vols.reads.read(vid, lsn, BitMap(range(PAGES)))
    return [dctx.decompress(f.frame) if f.frame else bytes(PAGE_SIZE) for f in frames]


def test_a_cold_load_reads_the_latest_checkpoint_then_the_records_after_it_in_parallel(
    store: ObjectStore,
) -> None:
    expected = history(Volumes(store, checkpoint_every=8), "v", 23)  # checkpoints 8, 16
    assert store.list(checkpoint_prefix("v")) == [checkpoint_key("v", n) for n in (8, 16)]
    watched = Watched(store)
    cold = Volumes(watched, checkpoint_every=8)  # type: ignore[arg-type]
    assert cold.reads.head("v") == Head("v", 23, PAGES)
    assert [k for k in watched.gets if "/checkpoints/" in k] == [checkpoint_key("v", 16)]
    records = [k for k in watched.gets if "/log/" in k]
    assert sorted(records) == [log_key("v", n) for n in range(17, 25)]  # 24: the probe
    assert watched.most_in_flight > 1  # the seven records were read at once, not in turn
    for lsn, pages in expected.items():  # older than the checkpoint too
        assert contents(cold, "v", lsn) == pages


def test_commits_write_a_checkpoint_when_the_log_since_the_last_one_is_long(
    store: ObjectStore,
) -> None:
    watched = Watched(store)
    vols = Volumes(watched, checkpoint_every=5)  # type: ignore[arg-type]
    watched.refuse_checkpoints = 1  # the checkpoint due at LSN 5 fails to be written
    expected = history(vols, "v", 5)
    assert store.list(checkpoint_prefix("v")) == []
    expected |= history(vols, "v", 6, start=5)  # LSN 6 writes it (5 since none), then 11
    assert store.list(checkpoint_prefix("v")) == [checkpoint_key("v", n) for n in (6, 11)]
    cold = Volumes(store)
    assert cold.reads.head("v") == Head("v", 11, PAGES)
    for lsn, pages in expected.items():
        assert contents(cold, "v", lsn) == pages


def test_a_damaged_or_vanished_record_in_a_parallel_load_is_corrupt_data(
    store: ObjectStore,
) -> None:
    history(Volumes(store, checkpoint_every=100), "v", 20)
    good = store.get(log_key("v", 13))
    assert good is not None
    store.put(log_key("v", 13), good[:-7] + bytes(7))
    with pytest.raises(CorruptData, match="commit record|log record"):
        Volumes(store).reads.head("v")
    store.put(log_key("v", 13), good)
    assert Volumes(store).reads.head("v") == Head("v", 20, PAGES)
    watched = Watched(store)
    watched.hidden.add(log_key("v", 17))  # listed, then gone: a record never vanishes
    with pytest.raises(CorruptData, match="log record 17 of 'v' vanished after listing"):
        Volumes(watched).reads.head("v")  # type: ignore[arg-type]


def test_a_crash_before_a_checkpoint_is_written_leaves_a_readable_volume(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(Exception):
        pass

    def crash_at(name: str) -> None:
        if name == "server.checkpoint.before_write":
            raise Crash(name)

    monkeypatch.setattr(index_module, "crash_point", crash_at)
    vols = Volumes(store, checkpoint_every=6)
    with pytest.raises(Crash):
        history(vols, "v", 6)  # LSN 6 landed; its checkpoint was never written
    monkeypatch.undo()
    assert store.list(checkpoint_prefix("v")) == []
    fresh = Volumes(store, checkpoint_every=6)  # another process: from the log alone
    assert fresh.reads.head("v") == Head("v", 6, PAGES)
    expected = history(fresh, "v", 1, start=6)  # the next commit writes the checkpoint
    assert store.list(checkpoint_prefix("v")) == [checkpoint_key("v", 7)]
    cold = Volumes(store)
    for lsn, pages in expected.items():
        assert contents(cold, "v", lsn) == pages
