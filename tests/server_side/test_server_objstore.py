"""ObjectStore contract, run against FsStore, MemoryStore and S3Store alike, plus specifics."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from graft_server.objstore import FsStore, MemoryStore, ObjectStore, open_store
from graft_server.s3store import S3Store
from graft_vfs.core.errors import InvalidRequest, StorageError


@pytest.fixture(params=["fs", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "s3":  # a real S3 server; each test has its own key prefix
        return request.getfixturevalue("seaweed").store()
    return FsStore(tmp_path / "store") if request.param == "fs" else MemoryStore()


def test_missing_key_is_none_not_an_error(store: ObjectStore) -> None:
    assert store.get("segments/nope") is None
    assert store.get_range("segments/nope", 0, 10) is None
    store.delete("segments/nope")


def test_put_get_and_overwrite(store: ObjectStore) -> None:
    store.put("a/b/c", b"one")
    assert store.get("a/b/c") == b"one"
    store.put("a/b/c", b"two")
    assert store.get("a/b/c") == b"two"


def test_get_range_is_clipped_at_the_end(store: ObjectStore) -> None:
    store.put("k", b"0123456789")
    assert store.get_range("k", 2, 3) == b"234"
    assert store.get_range("k", 8, 10) == b"89"
    assert store.get_range("k", 20, 5) == b""
    with pytest.raises(InvalidRequest):
        store.get_range("k", -1, 2)


def test_put_if_absent_never_overwrites(store: ObjectStore) -> None:
    assert store.put_if_absent("log/1", b"first") is True
    assert store.put_if_absent("log/1", b"second") is False
    assert store.get("log/1") == b"first"


def test_put_if_absent_race_has_exactly_one_winner(store: ObjectStore) -> None:
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def create(i: int) -> None:
        barrier.wait()
        results[i] = store.put_if_absent("volumes/v/log/1", f"writer {i}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert store.get("volumes/v/log/1") == f"writer {winners[0]}".encode()


def test_list_is_sorted_and_prefix_is_a_string_prefix(store: ObjectStore) -> None:
    for key in ["volumes/b/log/2", "volumes/b/log/1", "volumes/a/log/1", "volumes/ab/x", "segs/1"]:
        store.put(key, b"")
    assert store.list("volumes/b/") == ["volumes/b/log/1", "volumes/b/log/2"]
    assert store.list("volumes/a") == ["volumes/a/log/1", "volumes/ab/x"]
    assert store.list("volumes/a/") == ["volumes/a/log/1"]
    assert store.list("") == sorted([*store.list("volumes/"), "segs/1"])
    assert store.list("nothing/") == []


def test_list_start_after_resumes_a_listing(store: ObjectStore) -> None:
    log = [f"volumes/v/log/{lsn:020d}" for lsn in range(1, 8)]
    for key in [*log, "volumes/v/checkpoints/1", "volumes/v-2/log/1", "segs/1"]:
        store.put(key, b"")
    prefix = "volumes/v/log/"
    assert store.list(prefix, start_after=None) == log
    assert store.list(prefix, start_after=log[2]) == log[3:]
    assert store.list(prefix, start_after=log[2] + "0") == log[3:]  # need not exist
    assert store.list(prefix, start_after=log[-1]) == []
    assert store.list(prefix, start_after="a") == log  # before the prefix: everything
    assert store.list(prefix, start_after="volumes/v/log") == log
    assert store.list(prefix, start_after="z") == []  # after the prefix: nothing
    assert store.list("volumes/v/log/0000", start_after=log[4]) == log[5:]


def test_delete(store: ObjectStore) -> None:
    store.put("x/y", b"1")
    store.delete("x/y")
    assert store.get("x/y") is None
    assert store.list("x/") == []


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "..", "a//b", "a/", ".tmp/x", "a/.hidden", "a\\b", "a b", "é"]
)
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidRequest):
        store.put(key, b"")
    with pytest.raises(InvalidRequest):
        store.get(key)


def test_stats_count_calls(store: ObjectStore) -> None:
    store.put("a", b"1")
    store.put_if_absent("b", b"2")
    store.get("a")
    store.get_range("a", 0, 1)
    store.list("")
    store.delete("a")
    assert store.stats == {"gets": 1, "range_gets": 1, "puts": 2, "lists": 1, "deletes": 1}


def test_fs_store_persists_and_leaves_no_temporaries(tmp_path: Path) -> None:
    FsStore(tmp_path).put("volumes/v/log/1", b"data")
    FsStore(tmp_path).put_if_absent("volumes/v/log/1", b"other")
    reopened = FsStore(tmp_path)
    assert reopened.get("volumes/v/log/1") == b"data"
    assert reopened.list("") == ["volumes/v/log/1"]
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_fs_store_turns_os_errors_into_storage_errors(tmp_path: Path) -> None:
    store = FsStore(tmp_path)
    store.put("a", b"a file, not a directory")
    assert store.get("a/b") is None
    with pytest.raises(StorageError):
        store.put("a/b", b"x")
    with pytest.raises(StorageError):
        store.put_if_absent("a/b", b"x")
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_open_store(tmp_path: Path) -> None:
    fs = open_store(str(tmp_path / "plain"))
    assert isinstance(fs, FsStore) and fs.root == tmp_path / "plain"
    url = open_store((tmp_path / "url").as_uri())
    assert isinstance(url, FsStore) and url.root == tmp_path / "url"
    assert isinstance(open_store("memory://"), MemoryStore)
    s3 = open_store("s3://bucket/some/prefix/", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == (
        "bucket",
        "some/prefix",
        "http://127.0.0.1:9",
    )
    bare = open_store("s3://bucket")
    assert isinstance(bare, S3Store) and (bare.bucket, bare.prefix) == ("bucket", "")
    for bad in ["s3://", "s3:///prefix", "s3://bucket/a/../b", "s3://bucket/p?x=1"]:
        with pytest.raises(InvalidRequest):
            open_store(bad)
    with pytest.raises(InvalidRequest, match="unknown store scheme"):
        open_store("ftp://host/dir")
    with pytest.raises(InvalidRequest):
        open_store("")
