"""VFS semantics on a local-only client: snapshots, the writer lock, commits, SQLite quirks."""

from __future__ import annotations

import json

import apsw
import pytest

import graft_vfs
from support.clients import pragma


@pytest.fixture
def local(tmp_path):
    """Connections to local-only volumes (no server) sharing one cache directory."""
    cons = []

    def make(volume: str = "db", **kwargs):
        con = graft_vfs.connect(volume, remote="", cache_dir=str(tmp_path / "cache"), **kwargs)
        cons.append(con)
        return con

    yield make
    names = {c.open_vfs for c in cons}
    for c in cons:
        c.close()
    for n in names:
        graft_vfs.unregister(n)


def rows(n: int) -> str:
    """A row source of n integers (this SQLite build has no generate_series)."""
    return f"(WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) " + (
        "SELECT i FROM c)"
    )


def lsn(con):
    return pragma(con, "graft_snapshot")["local_lsn"]


def test_one_transaction_is_one_lsn(local):
    con = local()
    con.execute("CREATE TABLE t(x)")
    before = lsn(con)
    with con:
        for i in range(500):
            con.execute("INSERT INTO t VALUES(?)", (i,))
    assert lsn(con) == before + 1
    assert con.execute("SELECT count(*), sum(x) FROM t").fetchone() == (500, sum(range(500)))


def test_readers_keep_their_snapshot(local):
    a, b = local(), local()
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    b.execute("BEGIN")
    assert b.execute("SELECT count(*) FROM t").fetchone() == (1,)
    a.execute("INSERT INTO t VALUES(2)")
    assert b.execute("SELECT count(*) FROM t").fetchone() == (1,)
    b.execute("COMMIT")
    assert b.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_second_writer_gets_busy_and_locks_are_released(local):
    a, b = local(), local()
    a.execute("CREATE TABLE t(x UNIQUE)")
    a.execute("BEGIN IMMEDIATE")
    with pytest.raises(apsw.BusyError):
        b.execute("INSERT INTO t VALUES(1)")
    a.execute("INSERT INTO t VALUES(1)")
    with pytest.raises(apsw.ConstraintError):
        a.execute("INSERT INTO t VALUES(1)")  # an error inside the transaction
    a.execute("ROLLBACK")
    b.execute("INSERT INTO t VALUES(2)")  # the writer lock was released
    with pytest.raises(apsw.ConstraintError):
        b.execute("INSERT INTO t VALUES(3), (2)")  # an autocommit statement that fails
    a.execute("INSERT INTO t VALUES(4)")
    assert a.execute("SELECT x FROM t ORDER BY x").fetchall() == [(2,), (4,)]


def test_stale_snapshot_cannot_write_and_releases_on_rollback(local):
    a, b = local(), local()
    a.execute("CREATE TABLE t(x)")
    b.execute("BEGIN")
    b.execute("SELECT count(*) FROM t").fetchall()
    a.execute("INSERT INTO t VALUES(1)")
    with pytest.raises(apsw.BusyError):
        b.execute("INSERT INTO t VALUES(2)")
    b.execute("ROLLBACK")
    b.execute("INSERT INTO t VALUES(2)")
    a.execute("INSERT INTO t VALUES(3)")
    assert a.execute("SELECT count(*) FROM t").fetchone() == (3,)


def test_counter_only_and_identical_writes_record_no_commit(local):
    con = local()
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES('a')")
    before = lsn(con)
    con.execute("BEGIN IMMEDIATE; COMMIT")
    con.execute("UPDATE t SET x=x")  # SQLite rewrites the page and page 1 unchanged
    assert lsn(con) == before
    con.execute("UPDATE t SET x='b'")
    assert lsn(con) == before + 1


def test_rollback_after_cache_spill_changes_nothing(local):
    con = local()
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(randomblob(100))")
    before = lsn(con)
    checksum = con.execute("SELECT sum(length(x)), count(*) FROM t").fetchone()
    con.execute("PRAGMA cache_size=4")  # force SQLite to spill pages mid-transaction
    con.execute("BEGIN")
    for _ in range(300):
        con.execute("INSERT INTO t VALUES(randomblob(1000))")
    con.execute("ROLLBACK")
    assert lsn(con) == before
    assert con.execute("SELECT sum(length(x)), count(*) FROM t").fetchone() == checksum
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_vacuum_truncates_the_volume(local):
    con = local()
    con.execute("CREATE TABLE t(x)")
    con.execute(f"INSERT INTO t SELECT randomblob(3000) FROM {rows(200)}")
    big = pragma(con, "graft_snapshot")["page_count"]
    con.execute("DELETE FROM t")
    con.execute("VACUUM")
    small = pragma(con, "graft_snapshot")["page_count"]
    assert small < big / 10
    assert con.execute("PRAGMA page_count").fetchone() == (small,)
    con.execute(f"INSERT INTO t SELECT randomblob(3000) FROM {rows(50)}")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_wal_is_refused_with_a_clear_error(local):
    con = local()
    with pytest.raises(apsw.SQLError, match="journal_mode=MEMORY"):
        con.execute("PRAGMA journal_mode=WAL")
    assert con.execute("PRAGMA journal_mode").fetchone() == ("memory",)


def test_commits_are_durable_across_reopen(local, tmp_path):
    con = local("keep")
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(42)")
    status = pragma(con, "graft_status")
    name = con.open_vfs
    con.close()
    graft_vfs.unregister(name)
    again = local("keep")
    assert again.execute("SELECT x FROM t").fetchall() == [(42,)]
    assert pragma(again, "graft_status")["local_lsn"] == status["local_lsn"]
    assert pragma(again, "graft_status")["pending_push"] == status["pending_push"] > 0


def test_pragmas_answer_json(local):
    con = local()
    con.execute("CREATE TABLE t(x)")
    for name in ("graft_status", "graft_stats", "graft_snapshot", "graft_version"):
        rows = con.execute(f"PRAGMA {name}").fetchall()
        assert len(rows) == 1 and isinstance(json.loads(rows[0][0]), dict)
    stats = pragma(con, "graft_stats")
    for key in (
        "pages_fetched",
        "bytes_fetched",
        "requests",
        "cache_hits",
        "cache_misses",
        "commits_pushed",
        "commits_pulled",
    ):
        assert isinstance(stats[key], int)
    with pytest.raises(apsw.SQLError, match="no graft server configured"):
        con.execute("PRAGMA graft_push")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "-bad"])
def test_invalid_volume_names_cannot_be_opened(local, name):
    with pytest.raises(apsw.CantOpenError, match="invalid volume name"):
        local(name)


def test_unknown_volume_opened_read_only_is_an_error(local):
    with pytest.raises(apsw.CantOpenError, match="nope"):
        local("nope", readonly=True)
