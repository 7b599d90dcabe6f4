"""Zero-copy forks (`graft fork`, POST /v1/volumes/{vid}/fork) on every store kind."""

from __future__ import annotations

import json

import apsw
import pytest

import graft_vfs
from graft_server.gc import Retention, collect
from graft_server.objstore import MemoryStore
from graft_server.volumes import Volumes
from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import CommitConflict, InvalidRequest, SnapshotExpired
from support.clients import graft, pragma
from support.commits import commit, contents, page, random_page


def puts(store: MemoryStore) -> int:
    return store.stats["puts"] + store.stats["deletes"]


@pytest.mark.parametrize("size", [4, 600])
def test_a_fork_writes_one_object_whatever_the_size(size):
    store = MemoryStore()
    vols = Volumes(store)
    lsn = commit(vols, "src", 0, size, {p: random_page(p) for p in range(size)})
    lsn = commit(vols, "src", lsn, size, {1: page(7)})
    before = puts(store)
    forked = vols.forks.fork("src", "dst")
    assert puts(store) - before == 1
    assert (forked.lsn, forked.source_lsn, forked.page_count) == (1, 2, size)
    assert contents(Volumes(store), "dst") == contents(vols, "src")


def test_forks_live_their_own_lives_and_gc_keeps_what_any_of_them_names():
    store = MemoryStore()
    vols = Volumes(store)
    lsn = commit(vols, "src", 0, 3, {0: page(1), 1: page(2), 2: page(3)})
    first = contents(vols, "src", lsn)
    lsn = commit(vols, "src", lsn, 3, {0: page(4)})
    assert vols.forks.fork("src", "old", 1).source_lsn == 1
    assert vols.forks.fork("src", "new").source_lsn == 2
    assert vols.forks.fork("old", "old-of-old").source_lsn == 1  # a fork of a fork
    assert commit(vols, "old", 1, 4, {1: page(5), 3: page(6)}) == 2
    assert commit(vols, "src", 2, 3, {2: page(8)}) == 3
    assert contents(vols, "old") == [page(1), page(5), page(3), page(6)]
    assert contents(vols, "old-of-old") == first
    assert contents(vols, "new") == [page(4), page(2), page(3)]
    assert contents(vols, "src") == [page(4), page(2), page(8)]

    # The source keeps only its latest LSN and drops its first segment's pages from its
    # own history: the forks still name them, so GC keeps them.
    collect(Volumes(store), Retention(lsns=1), grace=0)
    cold = Volumes(store)
    assert contents(cold, "old-of-old") == first
    assert contents(cold, "old") == [page(1), page(5), page(3), page(6)]
    with pytest.raises(SnapshotExpired):
        contents(cold, "src", 1)
    # Once no volume names a segment any more, GC frees it.
    segments = len(store.list("segments/"))
    for vid, latest in (("old", 2), ("old-of-old", 1), ("new", 1)):
        commit(cold, vid, latest, 3, {p: page(50 + p) for p in range(3)})
    collect(Volumes(store), Retention(lsns=1), grace=0)
    assert len(store.list("segments/")) < segments
    final = Volumes(store)
    for vid in ("old", "old-of-old", "new"):
        assert contents(final, vid) == [page(50), page(51), page(52)]


def test_a_fork_refuses_an_existing_name_and_recognises_its_retry():
    store = MemoryStore()
    vols = Volumes(store)
    commit(vols, "src", 0, 1, {0: page(1)})
    commit(vols, "taken", 0, 1, {0: page(2)})
    with pytest.raises(CommitConflict, match="already exists"):
        vols.forks.fork("src", "taken")
    with pytest.raises(InvalidRequest, match="onto itself"):
        vols.forks.fork("src", "src")
    assert vols.forks.fork("src", "dst").source_lsn == 1
    assert Volumes(store).forks.fork("src", "dst").source_lsn == 1  # the same fork: landed
    commit(vols, "src", 1, 1, {0: page(3)})
    with pytest.raises(CommitConflict, match="already exists"):
        vols.forks.fork("src", "dst")  # another snapshot: another fork


def test_graft_fork_reads_like_its_source_and_logs_its_origin(server, vid, client, tmp_path):
    src = client(vid)
    src.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    with src:
        src.executemany("INSERT INTO t VALUES(?, ?)", [(i, "x" * 500) for i in range(400)])
    first = pragma(src, "graft_push")["remote_lsn"]
    src.execute("UPDATE t SET v = 'new' WHERE k = 7")
    latest = pragma(src, "graft_push")["remote_lsn"]
    assert latest == first + 1

    dst, old = f"{vid}-fork", f"{vid}-old"
    out = graft("fork", vid, dst, "--remote", server.url).stdout
    assert json.loads(out) == {
        "volume": dst, "lsn": 1, "source": vid, "source_lsn": latest,
        "page_count": src.execute("PRAGMA page_count").fetchone()[0],
    }
    graft("fork", vid, old, "--remote", server.url, "--lsn", str(first))

    query = "SELECT v FROM t WHERE k = 7"
    fetched = {}
    for name in (vid, dst, old):
        con = client(name)  # a fresh cache for each
        fetched[name] = pragma(con, "graft_stats")["pages_fetched"]
        row = con.execute(query).fetchone()
        assert row == ("x" * 500,) if name == old else row == ("new",)
        fetched[name] = pragma(con, "graft_stats")["pages_fetched"] - fetched[name]
    assert fetched[dst] <= fetched[vid]

    mine = client(dst)
    mine.execute("UPDATE t SET v = 'fork' WHERE k = 7")
    assert pragma(mine, "graft_push")["remote_lsn"] == 2
    assert src.execute(query).fetchone() == ("new",)
    assert client(dst).execute(query).fetchone() == ("fork",)

    log = [json.loads(line) for line in
           graft("log", dst, "--remote", server.url, "--json").stdout.splitlines()]
    assert [c["lsn"] for c in log] == [2, 1]
    assert log[1]["fork_of"] == {"volume": vid, "lsn": latest} and log[0]["fork_of"] is None
    text = graft("log", dst, "--remote", server.url).stdout
    assert f"fork of {vid} at LSN {latest}" in text.splitlines()[1]
    assert [c.fork_of for c in Remote(server.url).history(old)] == [(vid, first)]

    # The same fork again is recognised (a retry); another snapshot into the name is not.
    assert json.loads(graft("fork", vid, dst, "--remote", server.url).stdout)["lsn"] == 1
    again = graft("fork", vid, dst, "--remote", server.url, "--lsn", str(first), check=False)
    assert again.returncode == 1 and "already exists (LSN 2)" in again.stderr
    missing = graft("fork", f"{vid}-none", f"{vid}-x", "--remote", server.url, check=False)
    assert missing.returncode == 1 and f"{vid}-none" in missing.stderr


def test_a_diverged_volume_keeps_its_work_as_a_fork(server, vid, client, tmp_path):
    opts = graft_vfs.Options(autopush=False)
    a = client(vid, options=opts)
    a.execute("CREATE TABLE t(who TEXT)")
    base = pragma(a, "graft_push")["remote_lsn"]
    b = client(vid, options=opts)
    a.execute("INSERT INTO t VALUES('a')")
    pragma(a, "graft_push")
    b.execute("INSERT INTO t VALUES('b1')")
    b.execute("INSERT INTO t VALUES('b2')")
    with pytest.raises(apsw.SQLError, match="diverged"):
        b.execute("PRAGMA graft_push")

    saved = f"{vid}-mine"
    forked = pragma(b, f"graft_fork('{saved}')")
    assert forked == {"volume": saved, "lsn": 2, "source": vid, "source_lsn": base,
                      "local_commits": 2, "pages": forked["pages"]}
    assert pragma(b, f"graft_fork('{saved}')")["lsn"] == 2  # a retry: recognised
    assert pragma(b, "graft_status")["diverged"]  # the source is left as it was
    pragma(b, "graft_reset")
    assert b.execute("SELECT who FROM t").fetchall() == [("a",)]
    mine = client(saved)
    assert mine.execute("SELECT who FROM t ORDER BY who").fetchall() == [("b1",), ("b2",)]
    log = Remote(server.url).history(saved)
    assert [(c.lsn, c.fork_of) for c in log] == [(2, None), (1, (vid, base))]

    # From the command line, for a volume with unpushed commits that never diverged.
    cache = str(tmp_path / "cli-cache")
    c = client(vid, cache=cache, options=opts)
    c.execute("INSERT INTO t VALUES('c')")
    c.close()
    out = graft("fork", vid, f"{vid}-c", "--local", "--remote", server.url, "--cache", cache)
    assert json.loads(out.stdout)["local_commits"] == 1
    rows = client(f"{vid}-c").execute("SELECT who FROM t ORDER BY who").fetchall()
    assert rows == [("a",), ("c",)]
    taken = graft("fork", vid, saved, "--local", "--remote", server.url, "--cache", cache,
                  check=False)
    assert taken.returncode == 1 and "already exists" in taken.stderr
