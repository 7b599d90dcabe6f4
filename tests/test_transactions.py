"""Transactions retried on conflict (graft_vfs.transaction, @transactional) and read your
writes (PRAGMA graft_wait, min_lsn), through a real server on each store kind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import apsw
import pytest

import graft_vfs
from support.clients import pragma

OPTS = graft_vfs.Options(autopush=False)


def bank(client, vid):
    """Two clients (caches a and b) of one volume holding a counter at 0, pushed."""
    a = client(vid, options=OPTS)
    a.execute("CREATE TABLE counter(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    a.execute("INSERT INTO counter VALUES (1, 0)")
    assert pragma(a, "graft_push")["remote_lsn"] == 1
    b = client(vid, options=OPTS)
    return a, b


def increment(con, by: int = 1) -> int:
    # Clients add different amounts: two identical commits on one base have one commit
    # hash, which the server takes for a retry of the same push.
    con.execute("UPDATE counter SET n = n + ? WHERE id = 1", (by,))
    return con.execute("SELECT n FROM counter WHERE id = 1").fetchone()[0]


def test_transaction_runs_again_after_a_rejected_push_and_lands(client, vid):
    a, b = bank(client, vid)
    increment(a, 10)
    assert pragma(a, "graft_push")["remote_lsn"] == 2  # b's snapshot (LSN 1) is now stale
    runs = []
    tx = graft_vfs.transaction(b)
    for attempt in tx:
        with attempt:
            runs.append(increment(b))
    assert runs == [1, 11]  # the first run read LSN 1; after the reset, a's commit
    assert tx.attempts == 2 and len(tx.conflicts) == 1 and "push rejected" in tx.conflicts[0]
    assert tx.lsn == 3 and graft_vfs.landed_lsn(b) == 3
    status = pragma(b, "graft_status")
    assert status["remote_lsn"] == 3 and status["pending_push"] == 0 and not status["diverged"]
    assert pragma(a, "graft_pull")["remote_lsn"] == 3
    assert a.execute("SELECT n FROM counter").fetchone() == (11,)  # no increment lost


def test_transaction_runs_again_when_a_pull_made_its_snapshot_stale(client, vid):
    a, b = bank(client, vid)
    increment(a, 10)
    pragma(a, "graft_push")
    runs = []
    tx = graft_vfs.transaction(b)
    for attempt in tx:
        with attempt:
            runs.append(increment(b))
            if len(runs) == 1:
                # Moves b's volume on under the open transaction: its COMMIT is BUSY.
                assert pragma(b, "graft_pull")["pulled"]
    assert runs == [1, 11] and tx.lsn == 3
    assert "stale snapshot at COMMIT" in tx.conflicts[0]
    assert pragma(b, "graft_status")["pending_push"] == 0


def test_exception_in_the_body_rolls_back_and_propagates_unchanged(client, vid):
    a, _ = bank(client, vid)
    before = pragma(a, "graft_status")
    error = ValueError("not enough money")
    runs = []
    with pytest.raises(ValueError) as raised:
        for attempt in graft_vfs.transaction(a):
            with attempt:
                runs.append(increment(a))
                raise error
    assert raised.value is error and runs == [1]  # the same exception, never retried
    assert not a.in_transaction
    assert pragma(a, "graft_status") == before  # nothing committed, nothing pushed
    assert a.execute("SELECT n FROM counter").fetchone() == (0,)


def test_transaction_gives_up_after_its_last_attempt_with_a_clear_error(client, vid):
    a, b = bank(client, vid)
    runs = []
    with pytest.raises(graft_vfs.TransactionConflict, match=r"after 3 attempt\(s\)") as raised:
        for attempt in graft_vfs.transaction(b, attempts=3, backoff=0.001):
            with attempt:
                runs.append(increment(b))
                increment(a, 10)  # another client lands first, every time
                pragma(a, "graft_push")
    assert len(runs) == 3 and "attempts=" in str(raised.value)
    assert isinstance(raised.value.__cause__, apsw.SQLError)  # the last rejection
    status = pragma(b, "graft_status")
    assert status["pending_push"] == 0 and not status["diverged"]  # discarded, not stuck
    assert graft_vfs.landed_lsn(b) is None
    assert b.execute("SELECT n FROM counter").fetchone() == (30,)  # only a's increments


def test_transactional_decorator_returns_the_result_and_nests(client, vid):
    a, b = bank(client, vid)
    calls = []

    @graft_vfs.transactional
    def add(con, k: int) -> int:
        calls.append(k)
        return increment(con)

    @graft_vfs.transactional(attempts=5)
    def add_twice(con) -> int:
        add(con, 1)  # inside a transaction: part of this one
        return add(con, 2)

    increment(a, 10)
    pragma(a, "graft_push")
    assert add_twice(b) == 12  # a's increment and both of b's
    assert calls == [1, 2, 1, 2]  # the first run conflicted, the whole body ran again
    assert graft_vfs.landed_lsn(b) == 3
    assert add(b, 3) == 13 and graft_vfs.landed_lsn(b) == 4

    @graft_vfs.transactional
    def fails(con) -> None:
        increment(con)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        fails(b)
    assert b.execute("SELECT n FROM counter").fetchone() == (13,)


def test_transaction_arguments_are_checked(client, vid):
    a, _ = bank(client, vid)
    with pytest.raises(ValueError, match="attempts=0"):
        graft_vfs.transaction(a, attempts=0)
    a.execute("BEGIN")
    with pytest.raises(RuntimeError, match="already in a transaction"):
        for _attempt in graft_vfs.transaction(a):
            pass
    a.execute("ROLLBACK")


# -- read your writes --------------------------------------------------------------


def test_reader_waits_for_the_writers_lsn_and_reads_the_row(client, vid):
    a, b = bank(client, vid)
    assert b.execute("SELECT n FROM counter").fetchone() == (0,)  # b's cache is at LSN 1
    increment(a, 10)
    token = pragma(a, "graft_push")["remote_lsn"]
    assert token == 2
    assert b.execute("SELECT n FROM counter").fetchone() == (0,)  # no pull yet
    waited = pragma(b, f"graft_wait({token})")
    assert waited["remote_lsn"] == 2 and waited["pulls"] == 1
    assert b.execute("SELECT n FROM counter").fetchone() == (10,)
    # Already there: no pull at all.
    assert pragma(b, "graft_wait(2)")["pulls"] == 0


def test_wait_pulls_until_a_later_push_lands(client, vid):
    a, b = bank(client, vid)

    def later() -> None:
        time.sleep(0.5)
        increment(a, 10)
        pragma(a, "graft_push")

    writer = threading.Thread(target=later)
    writer.start()
    try:
        waited = pragma(b, "graft_wait('2,30')")
    finally:
        writer.join()
    assert waited["remote_lsn"] == 2 and waited["pulls"] >= 2
    assert b.execute("SELECT n FROM counter").fetchone() == (10,)


def test_wait_beyond_the_servers_latest_is_a_clear_error_after_the_timeout(client, vid):
    _, b = bank(client, vid)
    start = time.monotonic()
    with pytest.raises(apsw.SQLError, match="did not reach remote LSN 7 within 0.3 s") as raised:
        b.execute("PRAGMA graft_wait('7, 0.3')").fetchall()
    assert time.monotonic() - start >= 0.3
    assert "server is at LSN 1" in str(raised.value)
    assert isinstance(raised.value.__cause__, graft_vfs.LsnNotReached)
    for bad in ("graft_wait", "graft_wait('x')", "graft_wait(-1)", "graft_wait('1,-5')"):
        with pytest.raises(apsw.SQLError, match="graft_wait"):
            b.execute(f"PRAGMA {bad}").fetchall()


def test_connect_and_uri_min_lsn_open_a_replica_with_the_writers_commit(
    server, tmp_path, vid, connect
):
    writer = connect(vid, remote=server.url, cache_dir=str(tmp_path / "w"), options=OPTS)
    writer.execute("CREATE TABLE t(x)")
    pragma(writer, "graft_push")
    reader = connect(vid, remote=server.url, cache_dir=str(tmp_path / "r"), options=OPTS)
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)
    reader.close()
    writer.execute("INSERT INTO t VALUES ('mine')")
    token = pragma(writer, "graft_push")["remote_lsn"]
    # The reader's cache is at LSN 1 and nothing pulls in the background.
    reader = connect(
        vid, remote=server.url, cache_dir=str(tmp_path / "r"), options=OPTS, min_lsn=token
    )
    assert reader.execute("SELECT x FROM t").fetchall() == [("mine",)]
    writer.execute("INSERT INTO t VALUES ('again')")
    token = pragma(writer, "graft_push")["remote_lsn"]
    uri = f"file:{vid}?min_lsn={token}&min_lsn_timeout=10"
    raw = apsw.Connection(
        uri, flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY, vfs=reader.open_vfs
    )
    assert raw.execute("SELECT count(*) FROM t").fetchone() == (2,)
    raw.close()
    with pytest.raises(apsw.Error, match="did not reach remote LSN 99"):
        connect(
            vid, remote=server.url, cache_dir=str(tmp_path / "r"), min_lsn=99, min_lsn_timeout=0.2
        )
    with pytest.raises(apsw.Error, match="min_lsn"):
        apsw.Connection(
            f"file:{vid}?min_lsn=1&lsn=1",
            flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY,
            vfs=reader.open_vfs,
        )


# -- the README's example -----------------------------------------------------------


def test_readme_transaction_example_runs(server, tmp_path):
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        section = f.read().split("### Transactions and read your writes\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("http://127.0.0.1:3000", server.url)
    code = code.replace("/tmp/writer-cache", str(tmp_path / "w"))
    code = code.replace("/tmp/reader-cache", str(tmp_path / "r"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[(1, 70), (2, 30)]", proc.stdout
