"""`graft gc` against a running server: retained LSNs read back, old readers are safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import apsw
import pytest

import graft_vfs
from graft_server.index import FLOOR_RECHECK
from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import SnapshotExpired
from support.clients import pragma


def stored_bytes(srv) -> int:
    return sum(len(srv.read_object(key) or b"") for key in srv.objects())


def gc(srv, *args: str) -> dict:
    """``graft gc`` as a separate process on the server's store (directory or S3)."""
    cmd = [sys.executable, "-m", "graft_vfs.cli", "gc", "--store", srv.store, *args]
    if srv.s3_endpoint:
        cmd += ["--s3-endpoint", srv.s3_endpoint]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **srv.env},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def await_floor(url: str, vid: str, lsn: int) -> None:
    """Wait until the server answers 410 for ``lsn`` (it re-reads the GC floor periodically)."""
    remote = Remote(url)
    deadline = time.monotonic() + 20 * FLOOR_RECHECK  # a bound on the wait, not a timing
    try:
        while time.monotonic() < deadline:
            try:
                remote.read_pages(vid, lsn, [0])
            except SnapshotExpired:
                return
            time.sleep(0.1)
        pytest.fail(f"LSN {lsn} was still served {20 * FLOOR_RECHECK} s after the floor moved")
    finally:
        remote.close()


def test_gc_after_churn(client, vid, own_server):
    own_server.start()
    url = own_server.url
    writer = client(vid, remote=url, options=graft_vfs.Options(autopush=False))
    writer.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    writer.execute("INSERT INTO t SELECT value, 'v0' FROM json_each(json_array(1,2,3,4,5,6,7,8))")
    # Pages the old reader reads only after GC, so that read has to reach the server.
    writer.execute("CREATE TABLE later(b BLOB)")
    writer.execute("INSERT INTO later VALUES(randomblob(5 * 4096))")
    pragma(writer, "graft_push")
    expected = {}
    for i in range(1, 41):
        writer.execute("UPDATE t SET v = ? WHERE id = ?", (f"v{i}" * 300, i % 8 + 1))
        lsn = pragma(writer, "graft_push")["remote_lsn"]
        expected[lsn] = writer.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    latest = max(expected)
    old_reader = client(vid, remote=url, lsn=5)  # a reader pinned to an old snapshot
    old_reader.execute("BEGIN")
    assert old_reader.execute("SELECT count(*) FROM t").fetchone() == (8,)
    before = stored_bytes(own_server)

    report = gc(own_server, "--retain-lsns", "5", "--grace", "0")
    assert report["floors"] == {vid: latest - 4} and report["segments_deleted"] > 0
    assert stored_bytes(own_server) < before

    for lsn in range(latest - 4, latest + 1):  # every retained LSN reads back the same
        con = client(vid, remote=url, lsn=lsn)
        assert con.execute("SELECT id, v FROM t ORDER BY id").fetchall() == expected[lsn]
    fresh = client(vid, remote=url)
    assert fresh.execute("SELECT id, v FROM t ORDER BY id").fetchall() == expected[latest]
    assert fresh.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # Once the server has seen the floor, the old reader's cached pages still read, and a
    # page it never read is a clear "expired" error, never wrong data.
    await_floor(url, vid, 5)
    assert old_reader.execute("SELECT id, v FROM t ORDER BY id").fetchall() == expected[5]
    with pytest.raises(apsw.IOError, match="older than its retained history"):
        old_reader.execute("SELECT length(b) FROM later").fetchall()
    with pytest.raises(apsw.Error, match="older than its retained history"):
        client(vid, remote=url, lsn=5).execute("SELECT count(*) FROM t").fetchall()


def test_server_runs_gc_periodically(client, vid, own_server):
    # Pushes run while GC passes: a grace of 0 would let a pass delete the segment of a
    # commit between its upload and its log record (the grace period exists for that).
    own_server.args = ["--gc-interval", "0.3", "--retain-lsns", "2", "--gc-grace", "2"]
    own_server.start()
    writer = client(vid, remote=own_server.url, options=graft_vfs.Options(autopush=False))
    writer.execute("CREATE TABLE t(x)")
    for i in range(12):
        writer.execute("INSERT INTO t VALUES(?)", (i,))
        latest = pragma(writer, "graft_push")["remote_lsn"]
    log = f"volumes/{vid}/log/"

    def oldest() -> int:
        return int(own_server.objects(log)[0].removeprefix(log))

    deadline = time.monotonic() + 30
    while oldest() < latest - 1 and time.monotonic() < deadline:  # the last 2 retained
        time.sleep(0.1)
    assert oldest() == latest - 1  # the periodic pass moved the floor up, and no further
    fresh = client(vid, remote=own_server.url)
    assert fresh.execute("SELECT count(*), sum(x) FROM t").fetchone() == (12, sum(range(12)))


def test_running_server_answers_410_below_a_floor_set_by_another_process(client, vid, own_server):
    """`graft gc` in its own process raises the floor; the running server notices it."""
    own_server.start()
    writer = client(vid, remote=own_server.url, options=graft_vfs.Options(autopush=False))
    writer.execute("CREATE TABLE t(x)")
    for i in range(6):
        writer.execute("INSERT INTO t VALUES(?)", (i,))
        latest = pragma(writer, "graft_push")["remote_lsn"]
    remote = Remote(own_server.url)
    assert remote.read_pages(vid, 2, [0])  # the server has LSN 2 cached and readable
    # Default grace: the old segments stay, so only the floor can make LSN 2 expire.
    assert gc(own_server, "--retain-lsns", "2")["floors"] == {vid: latest - 1}
    deadline = time.monotonic() + 20 * FLOOR_RECHECK  # a bound on the wait, not a timing
    while time.monotonic() < deadline:
        try:
            remote.read_pages(vid, 2, [0])
        except SnapshotExpired as exc:
            assert "older than its retained history" in str(exc)
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"LSN 2 was still served {20 * FLOOR_RECHECK} s after the floor moved")
    with pytest.raises(SnapshotExpired):
        remote.log_entry(vid, 2)
    assert remote.read_pages(vid, latest - 1, [0])  # the retained LSNs still read
    assert remote.read_pages(vid, latest, [0])
    remote.close()
