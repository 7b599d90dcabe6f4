"""SQLite's own features through the graft VFS, compared with SQLite on a plain file.

This module is the project's statement of SQLite compatibility (README, "SQLite
compatibility"). Each case of the matrix runs the same SQL natively and on a volume,
compares the results, pushes, and checks a fresh replica with ``integrity_check`` and a
dump of every table. The rest are the cases that do not behave as natively on purpose:
what is refused (other page sizes, WAL) and what holds instead (journal modes, locking
modes, threads, crashes across a volume and a plain file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

import graft_vfs
from graft_vfs.client.vfs import GraftVFS
from support.clients import pragma
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)

URI_RW = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
NATIVE_VFS = "unix"


def count_to(n: int) -> str:
    """A row source of the integers 1..n (this SQLite build has no generate_series)."""
    return f"(WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) " + (
        "SELECT i FROM c)"
    )


def plain_uri(path: Path) -> str:
    """A plain file named explicitly: on a graft connection a bare name is a volume."""
    return f"file:{path}?vfs={NATIVE_VFS}"


def native(path: Path) -> apsw.Connection:
    return apsw.Connection(str(path), flags=URI_RW)


def dump(con: apsw.Connection) -> dict:
    """The schema and every row of every table (virtual tables through their shadows)."""
    schema = con.execute(
        "SELECT type, name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    tables = [n for t, n, sql in schema if t == "table" and not sql.startswith("CREATE VIRTUAL")]
    return {
        "schema": schema,
        "rows": {n: sorted(map(repr, con.execute(f'SELECT * FROM "{n}"'))) for n in tables},
    }


# -- the matrix: the same SQL natively and on a volume ---------------------------------


def case_savepoints(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE TABLE t(x)")
    con.execute(
        "SAVEPOINT a; INSERT INTO t VALUES(1); SAVEPOINT b; INSERT INTO t VALUES(2); "
        "ROLLBACK TO b; INSERT INTO t VALUES(3); RELEASE a"
    )
    con.execute("BEGIN; INSERT INTO t VALUES(4); SAVEPOINT c; INSERT INTO t VALUES(5); RELEASE c")
    con.execute("ROLLBACK")
    return con.execute("SELECT x FROM t ORDER BY x").fetchall()


def case_cache_spills(con: apsw.Connection, files: Path) -> list:
    con.execute("PRAGMA cache_size=10")  # every transaction below spills pages mid-way
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    con.execute(f"INSERT INTO t SELECT i, printf('%0400d', i) FROM {count_to(3000)}")
    con.execute("BEGIN; UPDATE t SET v = v || 'x'; SAVEPOINT s; DELETE FROM t WHERE k % 2")
    con.execute("ROLLBACK TO s; RELEASE s; COMMIT")
    con.execute("BEGIN; DELETE FROM t WHERE k > 100; ROLLBACK")
    return con.execute("SELECT count(*), sum(length(v)) FROM t").fetchall()


def case_temp_files(con: apsw.Connection, files: Path) -> list:
    con.execute("PRAGMA temp_store=FILE; PRAGMA cache_size=20")
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    con.execute(f"INSERT INTO t SELECT i, printf('%08d', (i * 7919) % 5000) FROM {count_to(5000)}")
    con.execute("CREATE TEMP TABLE tt AS SELECT v FROM t WHERE k % 3 = 0")
    con.execute("CREATE INDEX t_v ON t(v)")  # the sorter spills to a temporary file
    return [
        con.execute("SELECT count(*), min(v), max(v) FROM temp.tt").fetchall(),
        con.execute("SELECT v FROM t ORDER BY v DESC, k LIMIT 3").fetchall(),
        con.execute("SELECT count(*) FROM (SELECT v FROM t GROUP BY v)").fetchall(),
    ]


def case_auto_vacuum(con: apsw.Connection, files: Path) -> list:
    con.execute("PRAGMA auto_vacuum=INCREMENTAL")
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    con.execute(f"INSERT INTO t SELECT i, printf('%03000d', i) FROM {count_to(200)}")
    con.execute("DELETE FROM t WHERE k > 50")
    before = con.execute("PRAGMA freelist_count").fetchall()
    con.execute("PRAGMA incremental_vacuum(40)").fetchall()
    return [
        before,
        con.execute("PRAGMA freelist_count").fetchall(),
        con.execute("PRAGMA page_count").fetchall(),
        con.execute("PRAGMA auto_vacuum").fetchall(),
    ]


def case_vacuum_and_vacuum_into(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    con.execute(f"INSERT INTO t SELECT i, printf('%01000d', i) FROM {count_to(400)}")
    con.execute("DELETE FROM t WHERE k % 4")
    con.execute("VACUUM")
    into = files / "into.db"
    con.execute(f"VACUUM INTO '{plain_uri(into)}'")
    out = native(into)
    return [
        con.execute("PRAGMA page_count").fetchall(),
        out.execute("PRAGMA integrity_check").fetchall(),
        out.execute("SELECT count(*), sum(k) FROM t").fetchall(),
    ]


def case_backup_both_ways(con: apsw.Connection, files: Path) -> list:
    src = native(files / "source.db")
    src.execute("CREATE TABLE s(k INTEGER PRIMARY KEY, v TEXT)")
    src.execute(f"INSERT INTO s SELECT i, printf('%0300d', i) FROM {count_to(500)}")
    with con.backup("main", src, "main") as b:  # from a plain file into the database
        b.step()
    con.execute("INSERT INTO s VALUES(1000, 'after')")
    dst = native(files / "copy.db")
    with dst.backup("main", con, "main") as b:  # and back out to a plain file
        b.step()
    return [
        dst.execute("PRAGMA integrity_check").fetchall(),
        dst.execute("SELECT count(*), sum(k) FROM s").fetchall(),
    ]


def case_blob_io(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE TABLE b(id INTEGER PRIMARY KEY, data BLOB)")
    con.execute("INSERT INTO b VALUES(1, zeroblob(20000))")
    blob = con.blob_open("main", "b", "data", 1, True)
    blob.seek(9000)
    blob.write(b"graft" * 1000)
    blob.seek(8990)
    part = blob.read(30)
    blob.close()
    tail = con.execute("SELECT length(data), hex(substr(data, 13990, 20)) FROM b").fetchall()
    return [part, tail]


def case_fts5(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
    con.execute(
        f"INSERT INTO docs SELECT 'word' || (i % 10) || ' common ' || i FROM {count_to(500)}"
    )
    con.execute("INSERT INTO docs(docs) VALUES('optimize')")
    return [
        con.execute("SELECT count(*) FROM docs WHERE docs MATCH 'word3'").fetchall(),
        con.execute("SELECT rowid FROM docs WHERE docs MATCH '\"common 42\"'").fetchall(),
    ]


def case_rtree(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE VIRTUAL TABLE r USING rtree(id, x0, x1, y0, y1)")
    con.execute(f"INSERT INTO r SELECT i, i, i + 5, i % 50, i % 50 + 5 FROM {count_to(1000)}")
    return con.execute(
        "SELECT count(*), sum(id) FROM r WHERE x0 < 300 AND x1 > 200 AND y0 < 20 AND y1 > 10"
    ).fetchall()


def case_json(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE TABLE j(doc TEXT)")
    con.execute(
        f"INSERT INTO j SELECT json_object('id', i, 'tags', json_array('a', i % 3)) "
        f"FROM {count_to(100)}"
    )
    return [
        con.execute("SELECT sum(doc ->> '$.id') FROM j WHERE doc ->> '$.tags[1]' = 2").fetchall(),
        con.execute(
            "SELECT json_group_array(value) FROM j, json_each(j.doc, '$.tags') "
            "WHERE doc ->> '$.id' < 3"
        ).fetchall(),
        con.execute("SELECT json(jsonb(doc)) = doc FROM j LIMIT 1").fetchall(),
    ]


def case_strict_and_without_rowid(con: apsw.Connection, files: Path) -> list:
    con.execute("CREATE TABLE s(a INTEGER, b TEXT) STRICT")
    con.execute("INSERT INTO s VALUES(1, 'x')")
    try:
        con.execute("INSERT INTO s VALUES('not a number', 'y')")
        refused = None
    except apsw.ConstraintError as exc:
        refused = type(exc).__name__
    con.execute("CREATE TABLE w(k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")
    con.execute(f"INSERT INTO w SELECT printf('key%05d', i), i FROM {count_to(2000)}")
    con.execute("DELETE FROM w WHERE v % 7 = 0")
    return [refused, con.execute("SELECT count(*), min(k), max(k), sum(v) FROM w").fetchall()]


def case_attach_a_plain_file(con: apsw.Connection, files: Path) -> list:
    con.execute(f"ATTACH '{plain_uri(files / 'aux.db')}' AS aux")
    con.execute("CREATE TABLE main.t(x); CREATE TABLE aux.t(x)")
    con.execute("BEGIN; INSERT INTO main.t VALUES(1); INSERT INTO aux.t VALUES(2); COMMIT")
    con.execute("BEGIN; INSERT INTO main.t VALUES(3); INSERT INTO aux.t VALUES(4); ROLLBACK")
    out = con.execute("SELECT (SELECT sum(x) FROM main.t), (SELECT sum(x) FROM aux.t)").fetchall()
    con.execute("DETACH aux")
    return out


MATRIX: dict[str, Callable[[apsw.Connection, Path], list]] = {
    "savepoints": case_savepoints,
    "cache spills": case_cache_spills,
    "temp files and sorter spills": case_temp_files,
    "auto_vacuum": case_auto_vacuum,
    "VACUUM and VACUUM INTO": case_vacuum_and_vacuum_into,
    "backup both ways": case_backup_both_ways,
    "blob I/O": case_blob_io,
    "FTS5": case_fts5,
    "R*Tree": case_rtree,
    "JSON": case_json,
    "STRICT and WITHOUT ROWID": case_strict_and_without_rowid,
    "ATTACH a plain file": case_attach_a_plain_file,
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_feature_behaves_as_natively(client, vid, tmp_path, name):
    case = MATRIX[name]
    (tmp_path / "native").mkdir()
    (tmp_path / "graft").mkdir()
    plain = native(tmp_path / "native" / "native.db")
    expected = case(plain, tmp_path / "native")
    con = client(vid)
    assert case(con, tmp_path / "graft") == expected
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert dump(con) == dump(plain)
    pragma(con, "graft_push")
    fresh = client(vid)
    assert fresh.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert dump(fresh) == dump(plain)


# -- page sizes: only 4096 ever reaches a volume ----------------------------------------


def plain_with_page_size(path: Path, page_size: int) -> apsw.Connection:
    con = native(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    con.execute(f"INSERT INTO t SELECT i, printf('%0700d', i) FROM {count_to(300)}")
    return con


def page_size_via_pragma(con, vid, tmp_path, size):
    con.execute(f"PRAGMA page_size={size}")
    con.execute("CREATE TABLE t(x)")


def page_size_via_pragma_spelled_otherwise(con, vid, tmp_path, size):
    con.execute(f"PRAGMA page_size='0{size}'")
    con.execute("CREATE TABLE t(x)")


def page_size_via_vacuum(con, vid, tmp_path, size):
    con.execute(f"PRAGMA page_size={size}; VACUUM")


def page_size_via_backup(con, vid, tmp_path, size):
    src = plain_with_page_size(tmp_path / "src.db", size)
    with con.backup("main", src, "main") as b:
        b.step()


def page_size_via_vacuum_into(con, vid, tmp_path, size):
    src = plain_with_page_size(tmp_path / "src.db", size)
    src.execute(f"VACUUM INTO 'file:{vid}?vfs={con.open_vfs}'")


@pytest.mark.parametrize("size", [1024, 8192])
@pytest.mark.parametrize(
    "way",
    [
        page_size_via_pragma,
        page_size_via_pragma_spelled_otherwise,
        page_size_via_vacuum,
        page_size_via_backup,
        page_size_via_vacuum_into,
    ],
    ids=["pragma", "pragma-quoted", "pragma-vacuum", "backup", "vacuum-into"],
)
def test_other_page_sizes_are_refused_before_any_commit(client, vid, tmp_path, way, size):
    con = client(vid)
    if way is page_size_via_vacuum:
        con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
        con.execute(f"INSERT INTO t SELECT i, printf('%0700d', i) FROM {count_to(300)}")
        pragma(con, "graft_push")  # no background push of these left to land meanwhile
    before = pragma(con, "graft_snapshot")
    with pytest.raises(apsw.SQLError, match=f"page size {size}|page_size=0?{size}") as err:
        way(con, vid, tmp_path, size)
    assert "4096" in str(err.value)
    assert pragma(con, "graft_snapshot") == before  # nothing was committed
    pragma(con, "graft_push")
    fresh = client(vid)
    assert fresh.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert fresh.execute("PRAGMA page_size").fetchall() == [(4096,)]
    assert dump(fresh) == dump(con)


def test_backup_from_a_wal_file_leaves_an_openable_volume(client, vid, tmp_path):
    src = native(tmp_path / "wal.db")
    assert src.execute("PRAGMA journal_mode=WAL").fetchall() == [("wal",)]
    src.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    src.execute(f"INSERT INTO t SELECT i, printf('%0500d', i) FROM {count_to(200)}")
    con = client(vid)
    with con.backup("main", src, "main") as b:
        b.step()
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(200,)]  # same connection
    con.execute("INSERT INTO t VALUES(1000, 'after')")
    pragma(con, "graft_push")
    fresh = client(vid)
    assert fresh.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert fresh.execute("PRAGMA journal_mode").fetchall() == [("memory",)]
    assert fresh.execute("SELECT count(*), max(k) FROM t").fetchall() == [(201, 1000)]


# -- journal modes -----------------------------------------------------------------------


@pytest.fixture
def registered(tmp_path):
    """The VFS registered as "graft", as an application does before apsw.Connection."""
    graft_vfs.register(remote="", cache_dir=str(tmp_path / "cache"))
    yield "graft"
    graft_vfs.unregister()


def apsw_vfs(name: str) -> GraftVFS:
    """The VFS object registered under ``name``."""
    from graft_vfs.client.api import _registered

    return _registered[name]


def test_every_graft_main_database_runs_in_memory_journal_mode(registered, tmp_path):
    con = apsw.Connection("file:vol?vfs=graft", flags=URI_RW)
    assert con.execute("PRAGMA journal_mode").fetchall() == [("memory",)]
    for mode in ("delete", "truncate", "persist"):
        assert con.execute(f"PRAGMA journal_mode={mode}").fetchall() == [("memory",)]
    assert con.execute("PRAGMA journal_mode").fetchall() == [("memory",)]
    assert con.execute("PRAGMA journal_mode=OFF").fetchall() == [("off",)]
    assert con.execute("PRAGMA journal_mode=DELETE").fetchall() == [("off",)]
    plain = apsw.Connection(str(tmp_path / "plain.db"))  # other connections are left alone
    assert plain.execute("PRAGMA journal_mode").fetchall() == [("delete",)]


CROSS_COMMIT_CHILD = textwrap.dedent(
    """
    import os, signal, sys, apsw, graft_vfs
    cache, plain, mode = sys.argv[1:4]

    class CrashingFile(apsw.VFSFile):
        # kill -9 after the first page past page 1 of the plain file is written
        armed = False

        def __init__(self, name, flags):
            self.main = bool(flags[0] & apsw.SQLITE_OPEN_MAIN_DB)
            self.pages = 0
            super().__init__("", name, flags)

        def xWrite(self, data, offset):
            if self.main and CrashingFile.armed and offset > 0:
                self.pages += 1
                if self.pages == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            super().xWrite(data, offset)

    class Crashing(apsw.VFS):
        def __init__(self):
            super().__init__("crashing", "")

        def xOpen(self, name, flags):
            return CrashingFile(name, flags)

    vfs = Crashing()
    graft_vfs.register(remote="", cache_dir=cache)
    flags = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    con = apsw.Connection("file:vol?vfs=graft", flags=flags)
    if mode != "default":
        con.execute(f"PRAGMA journal_mode={mode}").fetchall()
    con.execute(f"ATTACH 'file:{plain}?vfs=crashing' AS p")
    con.execute("CREATE TABLE main.t(v); INSERT INTO main.t VALUES(0)")
    con.execute("CREATE TABLE p.t(k INTEGER PRIMARY KEY, v TEXT)")
    con.execute("INSERT INTO p.t VALUES(1, printf('%03000d', 0)), (2, printf('%03000d', 0))")
    CrashingFile.armed = True
    con.execute("BEGIN; UPDATE main.t SET v = 1; UPDATE p.t SET v = printf('%03000d', 1)")
    con.execute("COMMIT")
    print("not killed", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["default", "delete", "truncate", "persist"])
def test_crash_in_a_commit_across_a_volume_and_a_plain_file(tmp_path, mode):
    plain = tmp_path / "plain.db"
    cache = tmp_path / "cache"
    child = subprocess.run(
        [sys.executable, "-c", CROSS_COMMIT_CHILD, str(cache), str(plain), mode],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    # The plain file's hot journal is rolled back: it is whole, and as before.
    con = native(plain)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    same = "SELECT count(DISTINCT v), min(v) = printf('%03000d', 0) FROM t"
    assert con.execute(same).fetchall() == [(1, 1)]
    # The volume committed on its own, whole (each database is atomic, not the pair).
    vol = graft_vfs.connect("vol", remote="", cache_dir=str(cache))
    try:
        assert vol.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert vol.execute("SELECT v FROM t").fetchall() in ([(0,)], [(1,)])
    finally:
        vol.close()
        graft_vfs.unregister(vol.open_vfs)


def test_a_commit_needing_a_super_journal_on_a_volume_connection_is_refused(connect, tmp_path):
    con = connect("vol", remote="", cache_dir=str(tmp_path / "cache"))
    con.execute(f"ATTACH '{plain_uri(tmp_path / 'a.db')}' AS a")
    con.execute(f"ATTACH '{plain_uri(tmp_path / 'b.db')}' AS b")
    con.execute("CREATE TABLE a.t(x); CREATE TABLE b.t(x)")
    with pytest.raises(apsw.CantOpenError, match="open the connection on a plain file"):
        con.execute("BEGIN; INSERT INTO a.t VALUES(1); INSERT INTO b.t VALUES(2); COMMIT")
    counts = "SELECT (SELECT count(*) FROM a.t), (SELECT count(*) FROM b.t)"
    assert con.execute(counts).fetchall() == [(0, 0)]  # the transaction was rolled back
    # The way the message gives: the plain file is the main database, the volume attached.
    plain = native(tmp_path / "a.db")
    plain.execute(f"ATTACH 'file:vol?vfs={con.open_vfs}' AS v")
    plain.execute(f"ATTACH '{plain_uri(tmp_path / 'b.db')}' AS b")
    plain.execute("CREATE TABLE v.t(x)")
    plain.execute(
        "BEGIN; INSERT INTO main.t VALUES(1); INSERT INTO b.t VALUES(2); "
        "INSERT INTO v.t VALUES(3); COMMIT"
    )
    assert plain.execute(
        "SELECT (SELECT sum(x) FROM main.t), (SELECT sum(x) FROM b.t), (SELECT sum(x) FROM v.t)"
    ).fetchall() == [(1, 2, 3)]
    plain.close()


KILLED_TRANSACTION_CHILD = textwrap.dedent(
    """
    import os, signal, sys, graft_vfs
    cache, mode, where = sys.argv[1:4]
    con = graft_vfs.connect("vol", remote="", cache_dir=cache)
    con.execute(f"PRAGMA journal_mode={mode}").fetchall()
    con.execute("PRAGMA cache_size=5")  # the transaction spills pages to the VFS
    con.execute("BEGIN")
    con.execute("INSERT INTO t SELECT k + 1, printf('%0900d', k) FROM "
                "(WITH RECURSIVE c(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM c WHERE k < 500) "
                "SELECT k FROM c)")
    con.execute("UPDATE t SET v = 'changed' WHERE k = 1")
    if where == "before-commit":
        os.kill(os.getpid(), signal.SIGKILL)
    con.execute("COMMIT")  # GRAFT_CRASH_AT kills it once the commit is durable
    """
)


@pytest.mark.parametrize("mode", ["delete", "truncate", "persist", "memory", "off"])
@pytest.mark.parametrize("where", ["before-commit", "client.commit.after_local"])
def test_journal_modes_are_atomic_under_kill_9(tmp_path, mode, where):
    cache = tmp_path / "cache"
    con = graft_vfs.connect("vol", remote="", cache_dir=str(cache))
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES(1, 'before')")
    con.close()
    graft_vfs.unregister(con.open_vfs)
    env = {**os.environ, "GRAFT_EXIT_FLUSH_SECONDS": "0"}
    env.pop("GRAFT_CRASH_AT", None)
    if where != "before-commit":
        env["GRAFT_CRASH_AT"] = where
    child = subprocess.run(
        [sys.executable, "-c", KILLED_TRANSACTION_CHILD, str(cache), mode, where],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    con = graft_vfs.connect("vol", remote="", cache_dir=str(cache))
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        got = con.execute("SELECT count(*), (SELECT v FROM t WHERE k = 1) FROM t").fetchall()
        assert got == ([(1, "before")] if where == "before-commit" else [(501, "changed")])
    finally:
        con.close()
        graft_vfs.unregister(con.open_vfs)


def test_wal_is_refused(client, vid):
    con = client(vid)
    with pytest.raises(apsw.SQLError, match="journal_mode=MEMORY"):
        con.execute("PRAGMA journal_mode=WAL")


# -- locks: locking modes, BUSY, threads -------------------------------------------------


def exclusive_scenario(open_con: Callable[[], apsw.Connection]) -> list:
    """What two connections see when one of them is in locking_mode=EXCLUSIVE."""
    other, excl = open_con(), open_con()
    other.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    seen: list = []

    def attempt(con: apsw.Connection, sql: str) -> None:
        try:
            seen.append(con.execute(sql).fetchall())
        except apsw.BusyError:
            seen.append("busy")

    excl.execute("PRAGMA locking_mode=EXCLUSIVE").fetchall()
    attempt(excl, "SELECT count(*) FROM t")
    attempt(other, "INSERT INTO t VALUES(2)")  # the exclusive reader keeps others out
    attempt(excl, "INSERT INTO t VALUES(3)")
    attempt(excl, "INSERT INTO t VALUES(4)")
    attempt(excl, "SELECT count(*) FROM t")  # sees its own latest state
    attempt(other, "INSERT INTO t VALUES(5)")
    excl.execute("PRAGMA locking_mode=NORMAL").fetchall()
    attempt(excl, "SELECT count(*) FROM t")  # the lock goes when this transaction ends
    attempt(other, "INSERT INTO t VALUES(6)")
    attempt(excl, "SELECT sum(x) FROM t")
    return seen


def test_exclusive_locking_mode_behaves_as_natively(tmp_path, connect):
    def native_con() -> apsw.Connection:
        return native(tmp_path / "native.db")

    def graft_con() -> apsw.Connection:
        return connect("vol", remote="", cache_dir=str(tmp_path / "cache"))

    expected = exclusive_scenario(native_con)
    assert expected[1] == "busy" and expected[-1] == [(14,)]
    assert exclusive_scenario(graft_con) == expected


def test_exclusive_connection_under_a_pull_is_told_how_to_recover(client, vid, tmp_path):
    writer = client(vid)
    writer.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    pragma(writer, "graft_push")
    cache = str(tmp_path / "exclusive")
    excl, puller = client(vid, cache=cache), client(vid, cache=cache)
    excl.execute("PRAGMA locking_mode=EXCLUSIVE").fetchall()
    assert excl.execute("SELECT count(*) FROM t").fetchall() == [(1,)]
    writer.execute("INSERT INTO t VALUES(2)")
    pragma(writer, "graft_push")
    assert pragma(puller, "graft_pull")["pulled"]  # moves the volume under the exclusive lock
    with pytest.raises(apsw.BusyError, match="locking_mode=NORMAL"):
        excl.execute("INSERT INTO t VALUES(3)")
    excl.execute("PRAGMA locking_mode=NORMAL").fetchall()
    excl.execute("SELECT count(*) FROM t").fetchall()
    excl.execute("INSERT INTO t VALUES(3)")
    assert excl.execute("SELECT sum(x) FROM t").fetchall() == [(6,)]
    assert excl.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_busy_codes_say_which_busy(connect, tmp_path):
    a, b = (connect("vol", remote="", cache_dir=str(tmp_path / "cache")) for _ in range(2))
    a.execute("CREATE TABLE t(x)")
    b.execute("BEGIN")
    b.execute("SELECT count(*) FROM t").fetchall()
    a.execute("INSERT INTO t VALUES(1)")
    with pytest.raises(apsw.BusyError) as stale:
        b.execute("INSERT INTO t VALUES(2)")  # the snapshot is stale: retrying cannot help
    assert stale.value.extendedresult == apsw.SQLITE_BUSY_SNAPSHOT
    b.execute("ROLLBACK")
    a.execute("BEGIN IMMEDIATE")
    with pytest.raises(apsw.BusyError) as locked:
        b.execute("INSERT INTO t VALUES(2)")  # another writer: busy_timeout waits for it
    assert locked.value.extendedresult == apsw.SQLITE_BUSY
    a.execute("ROLLBACK")


def test_busy_wait_lets_other_threads_run(registered):
    """SQLite's busy handler sleeps in xSleep: the lock holder must be able to run meanwhile."""
    vfs = apsw_vfs(registered)
    entered, woke = threading.Event(), threading.Event()

    def busy_handler_sleep() -> None:
        entered.set()
        vfs.xSleep(10_000_000)
        woke.set()

    # A daemon: the interpreter may exit while it still sleeps.
    threading.Thread(target=busy_handler_sleep, daemon=True).start()
    entered.wait()
    for _ in range(20):  # Python work that needs the GIL again and again
        threading.Event().wait(0.001)
    assert not woke.is_set()  # it ran while the other thread slept, not after


def test_threads_with_busy_timeout_all_commit(connect, tmp_path):
    def open_con() -> apsw.Connection:
        con = connect("vol", remote="", cache_dir=str(tmp_path / "cache"))
        con.set_busy_timeout(5000)
        return con

    open_con().execute("CREATE TABLE t(thread, i)")
    cons = [open_con() for _ in range(3)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                cons[n].execute("INSERT INTO t VALUES(?, ?)", (n, i))
        except BaseException as exc:  # reported below, with the other threads' results
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cons[0].execute("SELECT thread, count(*) FROM t GROUP BY 1").fetchall() == [
        (0, 10),
        (1, 10),
        (2, 10),
    ]


# -- temporary files, read-only opens, schema changes pulled under statements -------------


def test_temporary_files_are_real_files_and_journals_stay_in_memory(registered):
    vfs = apsw_vfs(registered)
    base = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_DELETEONCLOSE
    for kind in (
        apsw.SQLITE_OPEN_TEMP_DB,
        apsw.SQLITE_OPEN_TEMP_JOURNAL,
        apsw.SQLITE_OPEN_SUBJOURNAL,
        apsw.SQLITE_OPEN_TRANSIENT_DB,
    ):
        f = vfs.xOpen(None, [base | kind, 0])
        assert isinstance(f, apsw.VFSFile)  # the default VFS's temporary file on disk
        f.xClose()
    journal = vfs.xOpen("vol-journal", [base | apsw.SQLITE_OPEN_MAIN_JOURNAL, 0])
    assert not isinstance(journal, apsw.VFSFile)


def test_bare_names_on_a_graft_connection_are_volumes(connect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    con = connect("vol", remote="", cache_dir=cache)
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    con.execute("ATTACH 'x.db' AS x")
    con.execute("CREATE TABLE x.t(y); INSERT INTO x.t VALUES(2)")
    con.execute("VACUUM INTO 'y.db'")
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "y.db").exists()
    assert connect("x.db", remote="", cache_dir=cache).execute("SELECT y FROM t").fetchall() == [
        (2,)
    ]
    assert connect("y.db", remote="", cache_dir=cache).execute("SELECT x FROM t").fetchall() == [
        (1,)
    ]


def test_read_only_opens_refuse_writes_as_natively(client, vid, tmp_path):
    con = client(vid)
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    first = pragma(con, "graft_push")["remote_lsn"]
    con.execute("INSERT INTO t VALUES(2)")
    pragma(con, "graft_push")
    plain = native(tmp_path / "plain.db")
    plain.execute("CREATE TABLE t(x)")
    ro_plain = apsw.Connection(str(tmp_path / "plain.db"), flags=apsw.SQLITE_OPEN_READONLY)
    cache = str(tmp_path / "cache0")
    ro = client(vid, cache=cache, readonly=True)
    past = client(vid, cache=cache, lsn=first)
    for c in (ro_plain, ro, past):
        with pytest.raises(apsw.ReadOnlyError):
            c.execute("INSERT INTO t VALUES(3)")
    assert ro.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
    assert past.execute("SELECT count(*) FROM t").fetchall() == [(1,)]


def test_immutable_open_reads_the_snapshot_of_its_open(connect, tmp_path):
    cache = str(tmp_path / "cache")
    con = connect("vol", remote="", cache_dir=cache)
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v INTEGER, pad TEXT)")
    con.execute(f"INSERT INTO t SELECT i, 1, printf('%0500d', i) FROM {count_to(2000)}")
    frozen = apsw.Connection(
        f"file:vol?vfs={con.open_vfs}&immutable=1",
        flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY,
    )
    frozen.execute("PRAGMA cache_size=10")  # most pages are read again from the VFS
    assert frozen.execute("SELECT sum(v) FROM t").fetchall() == [(2000,)]
    at_open = pragma(frozen, "graft_snapshot")["local_lsn"]
    con.execute("UPDATE t SET v = 2")
    assert frozen.execute("SELECT sum(v) FROM t").fetchall() == [(2000,)]
    assert pragma(frozen, "graft_snapshot")["local_lsn"] == at_open
    assert frozen.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with pytest.raises(apsw.ReadOnlyError):
        frozen.execute("INSERT INTO t VALUES(0, 0, '')")
    frozen.close()


def test_mmap_is_not_used(connect, tmp_path):
    con = connect("vol", remote="", cache_dir=str(tmp_path / "cache"))
    con.execute("CREATE TABLE t(x)")
    assert native(tmp_path / "plain.db").execute("PRAGMA mmap_size=65536").fetchall() == [
        (65536,)
    ]
    assert con.execute("PRAGMA mmap_size=65536").fetchall() == []


def test_schema_change_pulled_under_an_open_statement(client, vid, tmp_path):
    writer = client(vid)
    writer.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
    writer.execute(f"INSERT INTO t SELECT i, printf('%0500d', i) FROM {count_to(300)}")
    pragma(writer, "graft_push")
    cache = str(tmp_path / "reader")
    reader = client(vid, cache=cache)
    puller = client(vid, cache=cache)  # the same client, another connection
    rows = reader.execute("SELECT k FROM t ORDER BY k")
    head = [next(rows) for _ in range(10)]
    writer.execute("ALTER TABLE t ADD COLUMN w INTEGER DEFAULT 7")
    writer.execute("CREATE INDEX t_w ON t(w)")
    writer.execute("DELETE FROM t WHERE k > 100")
    pragma(writer, "graft_push")
    assert pragma(puller, "graft_pull")["pulled"]
    rest = list(rows)  # the open statement finishes on its snapshot
    assert [k for (k,) in head + rest] == list(range(1, 301))
    assert reader.execute("SELECT count(*), sum(w) FROM t").fetchall() == [(100, 700)]
    assert reader.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
