"""A local cache deleted or damaged: a clear error, never wrong data, rebuilt from the server.

- Deleted under a running client: the client keeps reading what it had (Linux keeps
  the open file) and can still push its unpushed commits, but a new local commit is
  refused (it would vanish with the process); a new client on the same path rebuilds
  the cache from the server.
- Bytes overwritten while no client runs: every row of the cache carries a checksum and
  SQLite checks its own structure, so reading damaged data raises CorruptData
  (SQLITE_CORRUPT inside SQLite) naming the cache file and the fix, never wrong rows.
- Garbage or truncated at open: CorruptData naming the file and the fix. An empty file
  is an empty cache: the client starts afresh from the server.

The server's store kind plays no part here, so these run on the directory store only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import apsw
import pytest

import graft_vfs
from graft_vfs.client.local import FORMAT, STORE_FILE
from graft_vfs.client.pagefile import PAGES_FILE
from support.clients import SqlChild, pragma

pytestmark = pytest.mark.stores("fs")

ROWS = 120
NO_PUSH = graft_vfs.Options(autopush=False)


def body(k: int) -> bytes:
    """Row ``k``'s value: random bytes, so that any damage to them would be visible."""
    return random.Random(k).randbytes(300)


def close_client(con: apsw.Connection) -> None:
    """Close a connection and its client: the cache file is then complete (no WAL)."""
    name = con.open_vfs
    con.close()
    graft_vfs.unregister(name)


def assert_names_cache_and_fix(message: str, cache: str) -> None:
    assert os.path.join(cache, STORE_FILE) in message
    assert f"delete the directory {cache}" in message
    assert "rebuild" in message


@pytest.fixture
def filled_cache(tmp_path, server, vid, connect):
    """A closed cache holding a volume of ROWS rows, every page local, one commit unpushed.

    Returns ``(cache_dir, expected_rows, pushed_rows)``.
    """
    cache = str(tmp_path / "cache")
    con = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES(?, ?)", ((k, body(k)) for k in range(ROWS)))
    pragma(con, "graft_push")
    pushed = con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    con.execute("UPDATE t SET v = randomblob(200) WHERE k % 5 = 0")  # not pushed
    expected = con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    assert pragma(con, "graft_status")["pending_push"] == 1
    close_client(con)
    assert not os.path.exists(os.path.join(cache, STORE_FILE + "-wal"))
    return cache, expected, pushed


# -- deleted under a running client ------------------------------------------------------


def test_cache_deleted_under_a_running_client(tmp_path, server, vid, connect):
    cache = str(tmp_path / "cache")
    child = SqlChild(vid, server.url, cache)
    try:
        child.rows("CREATE TABLE t(x TEXT)")
        child.rows("INSERT INTO t VALUES('pushed')")
        assert json.loads(child.rows("PRAGMA graft_push")[0][0])["pushed"]
        child.rows("INSERT INTO t VALUES('pending')")  # a local commit, not pushed yet

        shutil.rmtree(cache)  # under the running client

        # It still reads what it had, its unpushed commit included...
        assert child.rows("SELECT x FROM t ORDER BY x") == [("pending",), ("pushed",)]
        # ...but refuses a commit that would not be durable, and says what to do.
        refused = child.run("INSERT INTO t VALUES('after')")
        assert refused["error"] == "IOError", refused
        assert "was deleted or replaced" in refused["message"]
        assert os.path.join(cache, STORE_FILE) in refused["message"]
        assert "rebuilds the cache from the server" in refused["message"]
        assert child.rows("SELECT x FROM t ORDER BY x") == [("pending",), ("pushed",)]

        # A new client on the same path rebuilds the cache from the server: it has what
        # was pushed; the unpushed commit lives only in the running client.
        fresh = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
        assert os.path.exists(os.path.join(cache, STORE_FILE))
        assert fresh.execute("SELECT x FROM t").fetchall() == [("pushed",)]
        assert pragma(fresh, "graft_status")["pending_push"] == 0

        # The running client can still push it, so nothing is lost while it runs.
        assert json.loads(child.rows("PRAGMA graft_push")[0][0])["pushed"]
        assert pragma(fresh, "graft_pull")["pulled"]
        assert fresh.execute("SELECT x FROM t ORDER BY x").fetchall() == [
            ("pending",),
            ("pushed",),
        ]
        assert fresh.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        fresh.execute("INSERT INTO t VALUES('fresh')")  # the new cache takes commits
        assert pragma(fresh, "graft_push")["pushed"]
    finally:
        assert child.close() == 0


# -- bytes overwritten while no client runs ----------------------------------------------


def test_damaged_page_is_an_error_naming_the_cache_and_the_fix(
    filled_cache, tmp_path, server, vid, connect
):
    cache, expected, pushed = filled_cache
    path = os.path.join(cache, PAGES_FILE)  # where page data is (the rows name its slots)
    with open(path, "rb") as f:
        data = f.read()
    target = body(77)[:64]  # a pushed row, in a page of the cache (both of its versions)
    offsets = [m.start() for m in re.finditer(re.escape(target), data)]
    assert len(offsets) == 2
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset + 10)
            f.write(b"\x00" * 8)

    con = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    assert con.execute("SELECT count(*) FROM t WHERE k < 10").fetchone() == (10,)  # elsewhere
    with pytest.raises(apsw.CorruptError) as info:
        con.execute("SELECT v FROM t WHERE k = 77").fetchall()
    assert_names_cache_and_fix(str(info.value), cache)
    assert "fails its checksum" in str(info.value)
    with pytest.raises(apsw.CorruptError):  # and again: nothing was cached from it
        con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    with pytest.raises(apsw.CorruptError):  # a push would send it: refused too
        con.execute("PRAGMA graft_push")
    close_client(con)

    shutil.rmtree(cache)  # the fix the message gives
    con = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == pushed
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_random_damage_never_returns_wrong_data(filled_cache, tmp_path, server, vid):
    """16 random bytes at random offsets: each open reads right or raises a clear error."""
    cache, expected, _ = filled_cache
    size = os.path.getsize(os.path.join(cache, STORE_FILE))
    rng = random.Random(size)
    outcomes = {"same": 0, "error": 0}
    for i in range(60):
        damaged = str(tmp_path / f"damaged{i}")
        shutil.copytree(cache, damaged)
        with open(os.path.join(damaged, STORE_FILE), "r+b") as f:
            f.seek(rng.randrange(size - 16))
            f.write(rng.randbytes(16))
        name = f"damaged{i}"
        try:
            graft_vfs.register(server.url, damaged, name=name, options=NO_PUSH)
            con = apsw.Connection(
                f"file:{vid}?vfs={name}",
                flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE,
            )
            try:
                rows = con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
            finally:
                con.close()
            assert rows == expected, f"wrong data from damage #{i}"
            outcomes["same"] += 1
        except (graft_vfs.GraftError, apsw.Error) as exc:
            message = str(exc)
            if isinstance(exc, apsw.Error):
                assert isinstance(exc, apsw.CorruptError) and message.startswith("graft: "), exc
            assert_names_cache_and_fix(message, damaged)
            outcomes["error"] += 1
        finally:
            graft_vfs.unregister(name)
    print(f"random damage: {outcomes}")
    assert outcomes["error"] > 0


# -- garbage or truncated at open ----------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header-only"])
def test_garbage_or_truncated_cache_at_open(filled_cache, server, vid, connect, damage):
    cache, _, pushed = filled_cache
    path = os.path.join(cache, STORE_FILE)
    if damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a SQLite database\n" * 200)
    else:
        os.truncate(path, os.path.getsize(path) // 2 if damage == "truncated" else 50)
    with pytest.raises(graft_vfs.CorruptData) as info:
        connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    assert_names_cache_and_fix(str(info.value), cache)

    shutil.rmtree(cache)
    con = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == pushed


def test_empty_cache_file_is_a_new_cache(filled_cache, server, vid, connect):
    """Zero bytes is what SQLite calls an empty database: the client starts afresh."""
    cache, _, pushed = filled_cache
    os.truncate(os.path.join(cache, STORE_FILE), 0)
    con = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == pushed
    assert pragma(con, "graft_status")["pending_push"] == 0


def test_cache_of_the_first_format_gains_checksums(filled_cache, server, vid, connect):
    """A cache made before rows had checksums is upgraded at open, its commits kept."""
    cache, expected, _ = filled_cache
    path = os.path.join(cache, STORE_FILE)
    db = apsw.Connection(path)
    for table in ("volumes", "log", "pages"):
        db.execute(f"ALTER TABLE {table} DROP COLUMN crc")
    db.execute("PRAGMA user_version=0")
    db.close()

    con = connect(vid, remote=server.url, cache_dir=cache, options=NO_PUSH)
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == expected
    assert pragma(con, "graft_status")["pending_push"] == 1
    close_client(con)
    db = apsw.Connection(path)
    assert db.execute("PRAGMA user_version").fetchone() == (FORMAT,)
    assert db.execute("SELECT count(*) FROM pages WHERE crc = 0").fetchone() == (0,)
    db.close()
