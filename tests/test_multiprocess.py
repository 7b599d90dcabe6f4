"""Several processes on one cache directory: the same writer and snapshot rules as threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import apsw
import pytest

import graft_vfs
from support.clients import SqlChild


@pytest.fixture
def shared(tmp_path):
    cache = str(tmp_path / "shared-cache")
    opened: list = []

    def local(vid: str = "db"):
        con = graft_vfs.connect(vid, remote="", cache_dir=cache)
        opened.append(con)
        return con

    def shell(vid: str = "db", busy_ms: int = 0) -> SqlChild:
        s = SqlChild(vid, "", cache, busy_ms=busy_ms)
        opened.append(s)
        return s

    yield local, shell
    for item in opened:
        item.close()
    for name in {c.open_vfs for c in opened if isinstance(c, apsw.Connection)}:
        graft_vfs.unregister(name)


def test_one_writer_across_processes_and_commits_are_seen(shared):
    local, shell = shared
    me = local()
    me.execute("CREATE TABLE t(x)")
    other = shell()
    assert other.run("SELECT count(*) FROM t") == {"rows": [[0]]}
    assert other.run("BEGIN IMMEDIATE") == {"rows": []}
    assert other.run("INSERT INTO t VALUES('other')") == {"rows": []}
    with pytest.raises(apsw.BusyError):
        me.execute("INSERT INTO t VALUES('me')")
    assert other.run("COMMIT") == {"rows": []}
    assert me.execute("SELECT x FROM t").fetchall() == [("other",)]  # its commit is seen
    me.execute("INSERT INTO t VALUES('me')")
    assert other.run("SELECT x FROM t ORDER BY x") == {"rows": [["me"], ["other"]]}


def test_snapshots_hold_across_processes(shared):
    local, shell = shared
    me = local()
    me.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    other = shell()
    assert other.run("BEGIN") == {"rows": []}
    assert other.run("SELECT count(*) FROM t") == {"rows": [[1]]}
    me.execute("INSERT INTO t VALUES(2)")
    assert other.run("SELECT count(*) FROM t") == {"rows": [[1]]}  # its snapshot
    stale = other.run("INSERT INTO t VALUES(3)")  # a stale snapshot cannot write
    assert stale["error"] == "BusyError"
    assert other.run("ROLLBACK") == {"rows": []}
    assert other.run("SELECT count(*) FROM t") == {"rows": [[2]]}


INCREMENTS = 40  # each process's at least; both go on until each has met the other's lock
OVERLAP_BOUND = 120.0  # seconds; a bound on the run, not a timing


def test_concurrent_increments_from_two_processes_add_up(shared, tmp_path):
    """Two processes increment one row at once; every increment lands, and they did collide.

    Both connect, say so, and wait for one "go"; each then runs until it has made
    INCREMENTS increments and both have been refused with BUSY at least once (each
    leaves a file when it first is), so the two runs are known to have overlapped.
    """
    local, _ = shared
    me = local()
    me.execute("CREATE TABLE c(n INTEGER); INSERT INTO c VALUES(0)")
    worker = textwrap.dedent(
        """
        import glob, json, os, sys, time, apsw, graft_vfs
        cache, name = sys.argv[1], sys.argv[2]
        increments, bound = int(sys.argv[3]), float(sys.argv[4])
        con = graft_vfs.connect("db", remote="", cache_dir=cache)
        print("ready", flush=True)
        assert sys.stdin.readline() == "go\\n"
        deadline = time.monotonic() + bound
        done = busy = 0
        while done < increments or len(glob.glob(os.path.join(cache, "busy-*"))) < 2:
            if time.monotonic() > deadline:
                break
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("UPDATE c SET n = n + 1")
                con.execute("COMMIT")
                done += 1
            except apsw.BusyError:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if not busy:
                    open(os.path.join(cache, f"busy-{name}"), "w").close()
                busy += 1
                time.sleep(0.001)
        print(json.dumps({"done": done, "busy": busy}), flush=True)
        """
    )
    cache = str(tmp_path / "shared-cache")
    cmd = [sys.executable, "-c", worker, cache]
    procs = [
        subprocess.Popen(
            [*cmd, name, str(INCREMENTS), str(OVERLAP_BOUND)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        assert [p.stdout.readline() for p in procs] == ["ready\n", "ready\n"]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline() or "{}") for p in procs]
        assert [p.wait(timeout=30) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"two processes: {reports}")
    assert all(r["done"] >= INCREMENTS for r in reports), reports
    assert all(r["busy"] > 0 for r in reports), f"the processes never overlapped: {reports}"
    total = sum(r["done"] for r in reports)
    assert me.execute("SELECT n FROM c").fetchone() == (total,)
    assert me.execute("PRAGMA integrity_check").fetchone() == ("ok",)
