"""The warm path: every page local, no avoidable work per page.

- A sequential reader's misses in the memory cache read runs of pages from the local
  store in one query each (read-ahead), every page verified: a page of a run that fails
  its checksum is never served, and raises only when it is read.
- Random reads read one page per query (no read-ahead).
- Copying the local store's WAL back into its file runs on a thread of its own, off the
  commit path, and still happens.
- Page data is in the page file, read with ``pread``: bytes damaged on disk under a
  running store are seen, and refused, at the next read.

The server's store kind plays no part here, so these run on the directory store only.
"""

from __future__ import annotations

import json
import os
import random
import time

import apsw
import pytest

import graft_vfs
from graft_vfs.client.local import STORE_FILE, LocalStore
from graft_vfs.client.maintenance import CHECKPOINT_PAGES
from graft_vfs.client.pagefile import PAGES_FILE
from graft_vfs.core.errors import CorruptData

pytestmark = pytest.mark.stores("fs")

ROWS = 3000  # of about 300 bytes: a table of about 250 pages
NO_PUSH = graft_vfs.Options(autopush=False)
SMALL = graft_vfs.Options(autopush=False, cache_pages=64)  # a 256 KiB memory cache


def pragma(con: apsw.Connection, name: str) -> dict:
    return json.loads(con.execute(f"PRAGMA {name}").fetchone()[0])


def fill(con: apsw.Connection) -> list[tuple]:
    rng = random.Random(3)
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    with con:
        con.executemany(
            "INSERT INTO t VALUES(?, ?)", ((k, rng.randbytes(300)) for k in range(ROWS))
        )
    pragma(con, "graft_push")
    return con.execute("SELECT k, v FROM t ORDER BY k").fetchall()


@pytest.fixture
def hydrated(tmp_path, server, vid, connect):
    """A volume of ROWS rows pushed, and a closed cache holding every page of it.

    Returns ``(cache_dir, rows)``.
    """
    writer = connect(vid, remote=server.url, cache_dir=str(tmp_path / "writer"), options=NO_PUSH)
    rows = fill(writer)
    cache = str(tmp_path / "cache")
    graft_vfs.register(server.url, cache, name="warm-hydrate", options=NO_PUSH)
    try:
        con = apsw.Connection(
            f"file:{vid}",
            flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY,
            vfs="warm-hydrate",
        )
        assert pragma(con, "graft_hydrate")["pages_fetched"] > ROWS * 300 // 4096
        con.close()
    finally:
        graft_vfs.unregister("warm-hydrate")
    return cache, rows


def test_a_scan_reads_the_local_store_in_runs_with_every_row_right(hydrated, server, vid, connect):
    cache, rows = hydrated
    con = connect(vid, remote=server.url, cache_dir=cache, options=SMALL)
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == rows
    stats = pragma(con, "graft_stats")
    assert stats["cache_misses"] == 0 and stats["requests"] == 0  # every page was local
    pages = stats["local_hits"] + stats["cache_hits"]
    assert pages > 200
    # Runs double up to a quarter of the memory cache (16 pages): about 20 queries.
    assert stats["local_reads"] * 5 < pages, stats
    # And again, the memory cache being too small to hold the table: same rows.
    assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == rows


def test_random_reads_read_one_page_per_query(hydrated, server, vid, connect):
    cache, rows = hydrated
    con = connect(vid, remote=server.url, cache_dir=cache, options=SMALL)
    con.execute("PRAGMA cache_size=0")  # every read crosses the VFS
    rng = random.Random(8)
    for k in rng.sample(range(0, ROWS, 37), 40):
        assert con.execute("SELECT k, v FROM t WHERE k=?", (k,)).fetchall() == [rows[k]]
    stats = pragma(con, "graft_stats")
    # Lookups far apart read no runs: each local read brought the one page it needed.
    assert stats["local_reads"] == stats["local_hits"] > 0


def test_a_damaged_page_in_a_run_is_never_served_and_raises_when_read(hydrated, server, vid):
    cache, rows = hydrated
    store = LocalStore(cache)
    try:
        row = store.load_volume(vid)
        assert row is not None
        v, lsn = row.row_id, row.local_lsn
        run = store.read_run(v, 10, 8, lsn)
        assert [p for p, _, _ in run] == list(range(10, 18))
        assert all(store.read_page(v, p, lsn) == (row_lsn, data) for p, row_lsn, data in run)
        slot = store._page_rows(v, 13, lsn)[3]  # its bytes in the page file, damaged
        store.pagefile.write([slot], [bytes(4096)])
        # Inside a run: left out, so never cached nor served...
        assert [p for p, _, _ in store.read_run(v, 10, 8, lsn)] == [10, 11, 12, 14, 15, 16, 17]
        # ...and the page a run starts with, the one asked for, raises.
        with pytest.raises(CorruptData, match="page 13 of volume .* fails its checksum"):
            store.read_run(v, 13, 8, lsn)
    finally:
        store.close()
    graft_vfs.register(server.url, cache, name="warm-damaged", options=SMALL)
    try:
        con = apsw.Connection(
            f"file:{vid}",
            flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY,
            vfs="warm-damaged",
        )
        with pytest.raises(apsw.CorruptError) as info:
            con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
        assert os.path.join(cache, STORE_FILE) in str(info.value)
        with pytest.raises(apsw.CorruptError):  # and again: nothing was cached from it
            con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
        con.close()
    finally:
        graft_vfs.unregister("warm-damaged")


def test_the_wal_is_copied_back_off_the_commit_path(tmp_path):
    store = LocalStore(str(tmp_path))
    try:
        v = store.create_volume("v", 0, 0).row_id
        store_file = os.path.join(str(tmp_path), STORE_FILE)
        before = os.path.getsize(store_file)
        rng = random.Random(5)
        lsn = 0
        # Page data goes to the page file, so a commit is a few WAL frames (its rows):
        # enough commits to wake the checkpoint thread.
        while store._checkpoints.frames < CHECKPOINT_PAGES // 2:
            lsn = store.commit(v, lsn, {lsn % 300: rng.randbytes(4096)}, 300)
        for _ in range(CHECKPOINT_PAGES):
            lsn = store.commit(v, lsn, {lsn % 300: rng.randbytes(4096)}, 300)
            if os.path.getsize(store_file) > before:
                break
        deadline = time.monotonic() + 60
        while os.path.getsize(store_file) <= before and time.monotonic() < deadline:
            time.sleep(0.05)  # copied by the thread, not by the commit
        assert os.path.getsize(store_file) > before
        assert os.path.getsize(os.path.join(str(tmp_path), PAGES_FILE)) == lsn * 4096  # a slot each
        assert store.read_page(v, (lsn - 1) % 300, lsn)[0] == lsn
    finally:
        store.close()


def test_damage_under_a_running_store_is_refused_at_the_next_read(tmp_path):
    store = LocalStore(str(tmp_path))
    try:
        v = store.create_volume("v", 0, 0).row_id
        rng = random.Random(4)
        pages = {p: rng.randbytes(4096) for p in range(64)}
        lsn = store.commit(v, 0, pages, 64)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # all in the file
        assert store._db.execute("PRAGMA mmap_size").fetchone()[0] > 0
        assert store.read_page(v, 21, lsn) == (lsn, pages[21])
        path = os.path.join(str(tmp_path), PAGES_FILE)
        with open(path, "rb") as f:
            offset = f.read().index(pages[21])  # its slot in the page file
        with open(path, "r+b") as f:
            f.seek(offset + 100)
            f.write(bytes(16))
        with pytest.raises(CorruptData, match="page 21 of volume .* fails its checksum"):
            store.read_page(v, 21, lsn)
        assert store.read_page(v, 22, lsn) == (lsn, pages[22])  # the rest reads right
        # In a run: left out, and raising when it is the page asked for.
        assert [p for p, _, _ in store.read_run(v, 16, 8, lsn)] == [16, 17, 18, 19, 20, 22, 23]
        with pytest.raises(CorruptData, match="page 21 of volume .* fails its checksum"):
            store.read_run(v, 21, 8, lsn)
    finally:
        store.close()


def test_the_store_costs_benchmark_runs_every_operation():
    from benchmarks.warm import store_costs

    costs = store_costs(pages=300, reps=1)  # what it measures, not how fast
    assert set(costs) == {
        "read_page",
        "sql, key only",
        "sql, with data",
        "read_run, a page of 128",
        "commit, a page of 300 scattered",
        "store_fetched, a page of 128",
        "pread 4 KiB + crc32",
    }
    assert all(us > 0 for us in costs.values())
