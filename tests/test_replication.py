"""Replication through a real server: stateless replicas, push/pull, conflicts, past LSNs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import apsw
import pytest

import graft_vfs
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.link import Link
from graft_vfs.client.remote import Remote
from graft_vfs.client.runtime import OPENING_PAGES
from support.clients import pragma


@pytest.fixture(scope="module")
def sample_volume(sample_db, server):
    # A name of its own: with tests spread over workers, the module's fixtures may be
    # set up more than once against one session server.
    name = f"sample-{uuid.uuid4().hex[:8]}"
    import_database(Remote(server.url), sample_db, name)
    return name


QUERIES = [
    "SELECT * FROM orders WHERE id = 98765",
    "SELECT id, amount FROM orders WHERE customer_id = 1234 ORDER BY id",
    "SELECT * FROM orders WHERE id BETWEEN 5000 AND 5400 ORDER BY id",
    "SELECT c.name, count(*), round(sum(o.amount), 2) FROM customers c "
    "JOIN orders o ON o.customer_id = c.id WHERE c.id IN (5, 77, 901) GROUP BY c.id ORDER BY c.id",
    "SELECT country, count(*), min(id), max(id) FROM customers GROUP BY country ORDER BY country",
    "SELECT created, count(*), round(avg(amount), 4) FROM orders "
    "WHERE created >= '2026-11-20' GROUP BY created ORDER BY created",
    "SELECT count(*), round(sum(amount), 2) FROM orders",
]


def test_stateless_replica_point_lookup_fetches_under_one_percent(
    client, sample_volume, monkeypatch
):
    # "One request per miss" is the server path's accounting; with direct reads (S3)
    # a miss is a round of parallel ranged GETs (tests/test_direct.py covers those).
    monkeypatch.setenv("GRAFT_DIRECT", "0")
    con = client(sample_volume)
    status = pragma(con, "graft_status")
    # One request so far: the opening (the snapshot with page 1, the schema and the
    # upper levels of the B-trees).
    opened = pragma(con, "graft_stats")
    assert opened["requests"] == 1 and 1 <= opened["pages_fetched"] <= OPENING_PAGES
    row = con.execute("SELECT id, customer_id FROM orders WHERE id = 123457").fetchone()
    assert row[0] == 123457
    rows = con.execute("SELECT id FROM orders WHERE customer_id = 999").fetchall()
    assert rows
    stats = pragma(con, "graft_stats")
    assert 0 < stats["pages_fetched"] < status["page_count"] / 100
    # then one request per miss; what came along is leaves the B-tree hints predicted
    assert stats["requests"] - 1 == stats["cache_misses"] <= 8
    fetched = stats["pages_fetched"] - opened["pages_fetched"]
    assert fetched == stats["cache_misses"] + stats["pages_prefetched"]


class FixedLink(Link):
    """A link whose figures are given, not measured: fetch sizes then follow the data alone."""

    def observe(self, seconds: float, nbytes: int) -> None:
        pass

    def observe_pages(self, nbytes: int, pages: int) -> None:
        pass


def test_full_scan_fetches_runs_of_pages_per_request(client, sample_volume):
    con = client(sample_volume)
    remote = graft_vfs.runtime_of(con.open_vfs).remote
    assert remote is not None
    remote.link = FixedLink(rtt=0.001, bandwidth=200e6, page_bytes=2048)  # a loopback's
    assert con.execute("SELECT count(*), max(length(note)) FROM orders").fetchone()[0] == 200_000
    stats = pragma(con, "graft_stats")
    assert stats["pages_fetched"] > 3000
    assert stats["requests"] < stats["pages_fetched"] / 20
    assert stats["prefetch_unused"] < stats["pages_prefetched"] / 2


def test_results_equal_native_sqlite(client, sample_volume, sample_db):
    native = apsw.Connection(sample_db, flags=apsw.SQLITE_OPEN_READONLY)
    con = client(sample_volume)
    for sql in QUERIES:
        assert con.execute(sql).fetchall() == native.execute(sql).fetchall(), sql
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    native.close()


READER = """
import json, sys, graft_vfs
vid, url, cache = sys.argv[1:4]
con = graft_vfs.connect(vid, remote=url, cache_dir=cache)
def fetched():
    return json.loads(con.execute("PRAGMA graft_stats").fetchone()[0])["pages_fetched"]
def say(**kw):
    print(json.dumps(kw), flush=True)
say(rows=con.execute("SELECT count(*), sum(length(v)) FROM t").fetchone(), fetched=fetched())
sys.stdin.readline()
say(pulled=json.loads(con.execute("PRAGMA graft_pull").fetchone()[0]), fetched=fetched())
say(row=con.execute("SELECT v FROM t WHERE id = 1500").fetchone(), fetched=fetched())
"""


def test_push_then_pull_in_another_process_moves_only_changed_pages(client, vid, server, tmp_path):
    a = client(vid, options=graft_vfs.Options(autopush=False))
    a.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    with a:
        a.executemany("INSERT INTO t VALUES(?, ?)", ((i, "x" * 200) for i in range(3000)))
    first = pragma(a, "graft_push")
    assert first["pushed"] and pragma(a, "graft_status")["pending_push"] == 0
    b = subprocess.Popen(
        [sys.executable, "-c", READER, vid, server.url, str(tmp_path / "b-cache")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        seen = json.loads(b.stdout.readline())
        assert seen["rows"] == [3000, 600_000]
        a.execute("UPDATE t SET v = 'changed' WHERE id = 1500")
        assert pragma(a, "graft_push")["remote_lsn"] == first["remote_lsn"] + 1
        b.stdin.write("go\n")
        b.stdin.flush()
        pulled = json.loads(b.stdout.readline())
        changed = pulled["pulled"]["changed_pages"]
        assert pulled["pulled"]["pulled"] and 1 <= changed <= 3
        assert pulled["fetched"] == seen["fetched"]  # a pull moves no page data
        read = json.loads(b.stdout.readline())
        assert read["row"] == ["changed"]
        assert 1 <= read["fetched"] - seen["fetched"] <= changed  # only changed pages, on read
    finally:
        b.kill()
        b.wait()


def test_sync_pushes_then_pulls(client, vid):
    opts = graft_vfs.Options(autopush=False)
    a, b = client(vid, options=opts), client(vid, options=opts)
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    result = pragma(a, "graft_sync")
    assert result["push"]["pushed"] and not result["pull"]["pulled"]
    assert pragma(b, "graft_sync")["pull"]["pulled"]
    assert b.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_local_commits_roll_up_into_one_push(client, vid, server):
    con = client(vid, options=graft_vfs.Options(autopush=False))
    con.execute("CREATE TABLE t(x)")
    for i in range(5):
        con.execute("INSERT INTO t VALUES(?)", (i,))
    status = pragma(con, "graft_status")
    assert status["pending_push"] == 6 and status["remote_lsn"] == 0
    result = pragma(con, "graft_push")
    assert result == {**result, "pushed": True, "remote_lsn": 1, "local_commits": 6}
    assert Remote(server.url).snapshot(vid).lsn == 1


def test_background_push(client, vid, server):
    con = client(vid)
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    remote = Remote(server.url)
    for _ in range(200):
        if pragma(con, "graft_status")["pending_push"] == 0:
            break
        import time

        time.sleep(0.05)
    status = pragma(con, "graft_status")
    assert status["pending_push"] == 0 and status["remote_lsn"] == remote.snapshot(vid).lsn > 0
    fresh = client(vid)
    assert fresh.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_conflict_diverges_keeps_local_data_and_reset_recovers(client, vid):
    opts = graft_vfs.Options(autopush=False)
    a = client(vid, options=opts)
    a.execute("CREATE TABLE t(who TEXT)")
    pragma(a, "graft_push")
    b = client(vid, options=opts)
    a.execute("INSERT INTO t VALUES('a')")
    b.execute("INSERT INTO t VALUES('b')")
    assert pragma(a, "graft_push")["pushed"]
    with pytest.raises(apsw.SQLError, match="diverged.*graft_reset"):
        b.execute("PRAGMA graft_push")
    status = pragma(b, "graft_status")
    assert status["diverged"] and status["pending_push"] == 1
    assert b.execute("SELECT who FROM t").fetchall() == [("b",)]  # nothing silently lost
    with pytest.raises(apsw.SQLError, match="diverged"):
        b.execute("PRAGMA graft_pull")
    assert b.execute("SELECT who FROM t").fetchall() == [("b",)]
    reset = pragma(b, "graft_reset")
    assert reset["discarded_commits"] == 1
    assert b.execute("SELECT who FROM t").fetchall() == [("a",)]
    status = pragma(b, "graft_status")
    assert not status["diverged"] and status["pending_push"] == 0
    b.execute("INSERT INTO t VALUES('b2')")
    assert pragma(b, "graft_push")["pushed"]
    assert pragma(a, "graft_pull")["pulled"]
    assert a.execute("SELECT who FROM t ORDER BY who").fetchall() == [("a",), ("b2",)]


def test_the_same_update_from_two_clients_is_a_conflict_not_a_retry(client, vid):
    """Two clients increment a counter from the same snapshot: their commits are the
    same bytes on the same base, yet only the first lands; the second is diverged, never
    answered as a retry of the first (an update lost)."""
    opts = graft_vfs.Options(autopush=False)
    a = client(vid, options=opts)
    a.execute("CREATE TABLE counter(n INTEGER); INSERT INTO counter VALUES(0)")
    base = pragma(a, "graft_push")["remote_lsn"]
    b = client(vid, options=opts)
    for con in (a, b):
        con.execute("UPDATE counter SET n = n + 1")
    assert pragma(a, "graft_push")["remote_lsn"] == base + 1
    with pytest.raises(apsw.SQLError, match="diverged"):
        b.execute("PRAGMA graft_push")
    pragma(b, "graft_reset")
    b.execute("UPDATE counter SET n = n + 1")
    assert pragma(b, "graft_push")["remote_lsn"] == base + 2
    assert pragma(a, "graft_pull")["pulled"]
    assert a.execute("SELECT n FROM counter").fetchone() == (2,)


def test_reset_restores_every_page_of_many_local_commits(client, vid):
    con = client(vid, options=graft_vfs.Options(autopush=False))
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t VALUES(?, ?)", ((k, "a" * 1000) for k in range(60)))
    pragma(con, "graft_push")
    for k in range(0, 60, 3):
        con.execute("UPDATE t SET v = ? WHERE k = ?", ("b" * 1500, k))
    con.execute("DELETE FROM t WHERE k > 50")
    assert pragma(con, "graft_reset")["discarded_commits"] == 21
    assert con.execute("SELECT count(*), min(v), max(v) FROM t").fetchone() == (
        60,
        "a" * 1000,
        "a" * 1000,
    )
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_pull_inside_a_transaction_keeps_its_snapshot_and_its_commit_gets_busy(client, vid):
    """A pull while a transaction is open: the transaction keeps reading its snapshot.

    Read-only so far: its first write gets BUSY. Already writing: its COMMIT gets BUSY,
    and so does every retried COMMIT (SQLite keeps the transaction open after a BUSY
    commit and does not send the pages again: a retry must not report success with
    nothing committed). After ROLLBACK the pulled data is there, the transaction's is not.
    """
    opts = graft_vfs.Options(autopush=False)
    a = client(vid, options=opts)
    a.execute("CREATE TABLE t(x)")
    a.execute("INSERT INTO t VALUES(1)")
    pragma(a, "graft_push")
    b = client(vid, options=opts)
    for mode in ("read", "write"):
        a.execute("INSERT INTO t VALUES(?)", (f"a-{mode}",))
        pragma(a, "graft_push")
        b.execute("BEGIN")
        before = b.execute("SELECT x FROM t ORDER BY x").fetchall()
        if mode == "write":
            b.execute("INSERT INTO t VALUES(?)", (f"b-{mode}",))
        assert pragma(b, "graft_pull")["pulled"]
        if mode == "write":
            assert b.execute("SELECT x FROM t ORDER BY x").fetchall() == [
                *before,
                (f"b-{mode}",),
            ]
            for _ in range(2):
                with pytest.raises(apsw.BusyError, match="roll back"):
                    b.execute("COMMIT")
        else:
            assert b.execute("SELECT x FROM t ORDER BY x").fetchall() == before
            with pytest.raises(apsw.BusyError):
                b.execute("INSERT INTO t VALUES(?)", (f"b-{mode}",))
        assert b.in_transaction
        b.execute("ROLLBACK")
        expected = a.execute("SELECT x FROM t ORDER BY x").fetchall()
        assert (f"a-{mode}",) in expected
        assert b.execute("SELECT x FROM t ORDER BY x").fetchall() == expected
        assert pragma(b, "graft_status")["pending_push"] == 0
    b.execute("INSERT INTO t VALUES('b-after')")  # the writer lock was released
    assert pragma(b, "graft_push")["pushed"]
    assert b.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_past_lsn_is_read_only_and_stable(client, vid):
    a = client(vid, options=graft_vfs.Options(autopush=False))
    a.execute("CREATE TABLE t(x)")
    lsns = []
    for i in range(3):
        a.execute("INSERT INTO t VALUES(?)", (i,))
        lsns.append(pragma(a, "graft_push")["remote_lsn"])
    old = client(vid, lsn=lsns[0])
    assert old.execute("SELECT x FROM t").fetchall() == [(0,)]
    with pytest.raises(apsw.ReadOnlyError):
        old.execute("INSERT INTO t VALUES(9)")
    fresh = client(vid, lsn=lsns[1])  # a client whose log never saw that LSN
    assert fresh.execute("SELECT x FROM t ORDER BY x").fetchall() == [(0,), (1,)]
    with pytest.raises(apsw.CantOpenError, match="no LSN 99"):
        client(vid, lsn=99)


def test_unknown_volume_read_only_is_a_clear_error(client, vid):
    with pytest.raises(apsw.CantOpenError, match="does not exist"):
        client(vid, readonly=True)


def test_register_reads_environment_and_opens_uri(tmp_path, server, vid, monkeypatch):
    monkeypatch.setenv("GRAFT_REMOTE", server.url)
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "env-cache"))
    runtime = graft_vfs.register()
    try:
        assert runtime.remote is not None and runtime.remote.url == server.url
        flags = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        con = apsw.Connection(f"file:{vid}?vfs=graft", flags=flags)
        con.execute("PRAGMA journal_mode=MEMORY").fetchall()
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(7)")
        assert con.execute("SELECT x FROM t").fetchall() == [(7,)]
        assert os.path.exists(tmp_path / "env-cache")
        con.close()
    finally:
        graft_vfs.unregister()


def test_corrupt_segment_is_an_error_never_wrong_data(client, vid, own_server):
    own_server.start()
    a = client(vid, remote=own_server.url)
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES('precious')")
    pragma(a, "graft_push")
    originals = {key: own_server.read_object(key) for key in own_server.objects("segments/")}
    assert originals
    for key, data in originals.items():
        corrupt = bytearray(data)
        corrupt[-3] ^= 0xFF  # a byte of the last page's frame, not the index
        own_server.write_object(key, bytes(corrupt))
    b = client(vid, remote=own_server.url)
    with pytest.raises((apsw.CorruptError, apsw.IOError), match="(?i)checksum|corrupt"):
        b.execute("SELECT x FROM t").fetchall()
    assert pragma(b, "graft_status")["local_lsn"] == 1  # nothing was recorded
    for key, data in originals.items():  # repaired objects serve again: not cached
        own_server.write_object(key, data)
    assert b.execute("SELECT x FROM t").fetchall() == [("precious",)]


def test_hydrate_fetches_everything_missing_then_reads_are_local(client, sample_volume):
    con = client(sample_volume)
    con.execute("SELECT * FROM orders WHERE id = 5").fetchall()
    before = pragma(con, "graft_stats")["pages_fetched"]
    result = pragma(con, "graft_hydrate")
    pages = pragma(con, "graft_status")["page_count"]
    assert result["pages_fetched"] + before >= pages - 1  # everything not fetched yet
    assert result["requests"] <= pages // 4096 + 1
    assert pragma(con, "graft_hydrate")["pages_fetched"] == 0  # idempotent
    fetched = pragma(con, "graft_stats")["pages_fetched"]
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert pragma(con, "graft_stats")["pages_fetched"] == fetched  # all reads were local
