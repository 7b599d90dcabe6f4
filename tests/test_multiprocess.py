"""Several processes on one cache directory: the same writer and snapshot rules as threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import apsw
import pytest

import graft_vfs

SQL_SHELL = textwrap.dedent(
    """
    import json, sys, apsw, graft_vfs
    con = graft_vfs.connect(sys.argv[1], remote="", cache_dir=sys.argv[2])
    con.set_busy_timeout(int(sys.argv[3]))
    for line in sys.stdin:
        try:
            rows = con.execute(line).fetchall()
            print(json.dumps({"rows": rows}), flush=True)
        except apsw.Error as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
    """
)


class Shell:
    """Another process running SQL on the same volume and cache directory."""

    def __init__(self, vid: str, cache: str, busy_ms: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SQL_SHELL, vid, cache, str(busy_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, sql: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(sql.replace("\n", " ") + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def shared(tmp_path):
    cache = str(tmp_path / "shared-cache")
    opened: list = []

    def local(vid: str = "db"):
        con = graft_vfs.connect(vid, remote="", cache_dir=cache)
        opened.append(con)
        return con

    def shell(vid: str = "db", busy_ms: int = 0) -> Shell:
        s = Shell(vid, cache, busy_ms)
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


def test_concurrent_increments_from_two_processes_add_up(shared, tmp_path):
    local, _ = shared
    me = local()
    me.execute("CREATE TABLE c(n INTEGER); INSERT INTO c VALUES(0)")
    worker = textwrap.dedent(
        """
        import sys, time, apsw, graft_vfs
        con = graft_vfs.connect("db", remote="", cache_dir=sys.argv[1])
        done = 0
        while done < 40:
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("UPDATE c SET n = n + 1")
                con.execute("COMMIT")
                done += 1
            except apsw.BusyError:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                time.sleep(0.001)
        """
    )
    cache = str(tmp_path / "shared-cache")
    procs = [subprocess.Popen([sys.executable, "-c", worker, cache]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert me.execute("SELECT n FROM c").fetchone() == (80,)
    assert me.execute("PRAGMA integrity_check").fetchone() == ("ok",)
