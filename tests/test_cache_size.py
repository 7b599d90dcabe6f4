"""The local cache stays bounded: old versions are pruned, and a size limit evicts clean pages."""

from __future__ import annotations

import json
import os

import apsw
import pytest

import graft_vfs
from graft_vfs.client.local import STORE_FILE
from graft_vfs.core.ids import PAGE_SIZE
from support.clients import SqlChild, graft
from support.old_cache import inline_page_data
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)

ROWS = 40  # of about 1 KB: a database of a dozen pages
COMMITS = 60  # each rewrites every leaf page, and is pushed


def store_file(cache: str) -> str:
    return os.path.join(cache, STORE_FILE)


def cache_rows(cache: str) -> tuple[int, int]:
    """(page rows, log rows) in a cache directory's store."""
    con = apsw.Connection(store_file(cache), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return con.execute(
            "SELECT (SELECT count(*) FROM pages), (SELECT count(*) FROM log)"
        ).fetchone()
    finally:
        con.close()


def cached_pages(cache: str) -> dict[int, list[int]]:
    """Page number -> local LSNs of the rows that hold data."""
    con = apsw.Connection(store_file(cache), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        out: dict[int, list[int]] = {}
        for pageno, lsn in con.execute(
            "SELECT pageno, lsn FROM pages WHERE data IS NOT NULL ORDER BY pageno, lsn"
        ):
            out.setdefault(pageno, []).append(lsn)
        return out
    finally:
        con.close()


def file_pages_bound(page_rows: int) -> int:
    """The most file pages a store of ``page_rows`` rows of one volume may take.

    A 4 KiB page does not fit in a 4 KiB B-tree page: each row takes one overflow page
    and about 500 bytes of a leaf (leaves at least half full after deletions: 4 rows
    each). The schema, volumes, log, the page file's two tables and an interior page of
    pages: at most 10 more. (Rows of the page file's format take far less: their data is
    in the page file.)
    """
    return page_rows + -(-page_rows // 4) + 10


def push(con: apsw.Connection) -> dict:
    return json.loads(con.execute("PRAGMA graft_push").fetchone()[0])


def make_table(con: apsw.Connection, rows: int = ROWS) -> None:
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, body TEXT)")
    with con:
        con.executemany(
            "INSERT INTO t(n, body) VALUES (0, ?)", [(f"{i:04d}" * 250,) for i in range(rows)]
        )
    push(con)


def close_clients(*cons: apsw.Connection) -> None:
    """Close connections and their clients (so their cache files are closed too)."""
    names = {con.open_vfs for con in cons}
    for con in cons:
        con.close()
    for name in names:
        graft_vfs.unregister(name)


def reopen(con: apsw.Connection, vid: str, remote: str, cache: str, **options) -> apsw.Connection:
    """A new client on the same cache directory: nothing in memory, everything from the file."""
    close_clients(con)
    return graft_vfs.connect(
        vid, remote=remote, cache_dir=cache, options=graft_vfs.Options(autopush=False, **options)
    )


def test_cache_of_a_small_database_stays_bounded_after_many_pushed_commits(
    server, vid, tmp_path
):
    cache = str(tmp_path / "cache")
    con = graft_vfs.connect(
        vid, remote=server.url, cache_dir=cache, options=graft_vfs.Options(autopush=False)
    )
    make_table(con)
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    for _ in range(COMMITS):
        con.execute("UPDATE t SET n = n + 1")  # rewrites every leaf page
        assert push(con)["pushed"]
    # One version per page and one log row (the sync point) are all a snapshot reads;
    # without pruning there would be a version per page per commit.
    assert cache_rows(cache) == (pages, 1)
    # The file holds those rows and no free pages.
    con2 = apsw.Connection(store_file(cache), flags=apsw.SQLITE_OPEN_READONLY)
    free, file_pages = (
        con2.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_count")
    )
    con2.close()
    assert free == 0
    assert os.path.getsize(store_file(cache)) == file_pages * PAGE_SIZE
    assert file_pages <= file_pages_bound(pages), (file_pages, pages)
    con = reopen(con, vid, server.url, cache)
    assert con.execute("SELECT count(*), sum(n) FROM t").fetchone() == (ROWS, ROWS * COMMITS)
    # DELETE + VACUUM shrinks the database, and the cache with it.
    con.execute("DELETE FROM t")
    con.execute("VACUUM")
    assert push(con)["pushed"]
    small = con.execute("PRAGMA page_count").fetchone()[0]
    assert small < pages
    assert cache_rows(cache) == (small, 1)
    assert os.path.getsize(store_file(cache)) <= file_pages_bound(small) * PAGE_SIZE
    other = graft_vfs.connect(vid, remote=server.url, cache_dir=str(tmp_path / "other"))
    assert other.execute("SELECT count(*) FROM t").fetchone() == (0,)
    close_clients(other, con)


LIMIT_PAGES = 4


def leaf_pages(con: apsw.Connection) -> list[int]:
    """Table t's leaf pages, as volume page numbers (SQLite counts from 1)."""
    return [
        p - 1
        for (p,) in con.execute(
            "SELECT pageno FROM dbstat WHERE name='t' AND pagetype='leaf' ORDER BY pageno"
        )
    ]


def test_cache_max_bytes_evicts_clean_pages_least_recently_used_first(server, vid, tmp_path):
    writer = graft_vfs.connect(
        vid, remote=server.url, cache_dir=str(tmp_path / "w"), options=graft_vfs.Options()
    )
    make_table(writer, rows=80)
    leaves = leaf_pages(writer)
    assert len(leaves) >= 18
    cache = str(tmp_path / "r")
    options = {"cache_max_bytes": LIMIT_PAGES * PAGE_SIZE, "cache_pages": 0}
    reader = graft_vfs.connect(
        vid,
        remote=server.url,
        cache_dir=cache,
        options=graft_vfs.Options(autopush=False, **options),
    )
    vol = graft_vfs.runtime_of(reader.open_vfs).volume(vid, create=False)
    lsn = vol.snapshot[0]
    # Leaves read one by one (no stride for the prefetcher): the last four stay.
    order = [leaves[i] for i in (3, 11, 6, 15, 1, 9)]
    for p in order:
        vol.read_page(p, lsn)
    assert sorted(cached_pages(cache)) == sorted(order[-4:])
    # A read from the file makes a page recently used: the next fetch evicts the page
    # fetched longest ago instead (order[3]), not the one read longest ago (order[2]).
    misses = vol.stats.cache_misses
    vol.read_page(order[2], lsn)
    assert vol.stats.cache_misses == misses  # from the file
    vol.read_page(leaves[13], lsn)
    assert sorted(cached_pages(cache)) == sorted([order[2], order[4], order[5], leaves[13]])

    # Unpushed pages are never evicted, even when they alone exceed the limit.
    reader.execute("UPDATE t SET n = -id WHERE id % 10 = 0")  # a row in every 2nd leaf or so
    row = vol.refresh()
    changed = set(vol.local.pending_changes(vol.row_id, row.sync_lsn, row.local_lsn))
    assert len(changed) > LIMIT_PAGES
    absent = next(p for p in leaves if p not in cached_pages(cache))
    misses = vol.stats.cache_misses
    vol.read_page(absent, row.local_lsn)
    assert vol.stats.cache_misses == misses + 1  # a fetch, so an eviction pass
    cached = cached_pages(cache)
    unpushed = {p for p, lsns in cached.items() if max(lsns) > row.sync_lsn}
    assert unpushed == changed
    assert {p for p, lsns in cached.items() if min(lsns) <= row.sync_lsn} == set()

    # Evicted pages come back from the server: a new client on the file reads every row
    # right, fetching them again, and keeps no more than the unpushed pages.
    reader = reopen(reader, vid, server.url, cache, **options)
    expected = [
        (i, -i if i % 10 == 0 else 0, f"{i - 1:04d}" * 250) for i in range(1, 81)
    ]
    assert reader.execute("SELECT id, n, body FROM t ORDER BY id").fetchall() == expected
    stats = json.loads(reader.execute("PRAGMA graft_stats").fetchone()[0])
    assert stats["cache_misses"] > 0
    assert {p for p, lsns in cached_pages(cache).items() if min(lsns) <= row.sync_lsn} == set()
    assert push(reader)["pushed"]
    writer.execute("PRAGMA graft_pull").fetchall()
    assert writer.execute("SELECT id, n, body FROM t ORDER BY id").fetchall() == expected
    close_clients(reader, writer)


def test_pruning_keeps_what_readers_in_other_processes_and_past_snapshots_read(
    server, vid, tmp_path
):
    cache = str(tmp_path / "shared")
    con = graft_vfs.connect(
        vid, remote=server.url, cache_dir=cache, options=graft_vfs.Options(autopush=False)
    )
    make_table(con)
    con.execute("CREATE TABLE u(id INTEGER PRIMARY KEY, n INTEGER, body TEXT)")
    with con:
        con.executemany("INSERT INTO u(n, body) VALUES (0, ?)", [("u" * 1000,)] * ROWS)
    base = push(con)["remote_lsn"]
    reader = SqlChild(vid, server.url, cache)
    try:
        assert reader.rows("BEGIN") == []
        assert reader.rows("SELECT count(*) FROM t") == [(ROWS,)]  # pins the snapshot at `base`
        past = graft_vfs.connect(vid, remote=server.url, cache_dir=cache, lsn=base)
        for _ in range(5):
            con.execute("UPDATE u SET n = n + 1")
            assert push(con)["pushed"]
        # Table u was read by neither at their snapshot: its old versions were kept.
        assert reader.rows("SELECT sum(n) FROM u") == [(0,)]
        assert past.execute("SELECT sum(n) FROM u").fetchone() == (0,)
        assert reader.rows("COMMIT") == []
        assert reader.rows("SELECT sum(n) FROM u") == [(5 * ROWS,)]
        past.close()
        con.execute("UPDATE u SET n = n + 1")
        assert push(con)["pushed"]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        assert cache_rows(cache) == (pages, 1)
        assert reader.rows("SELECT sum(n) FROM u") == [(6 * ROWS,)]
    finally:
        reader.kill()
        close_clients(con)


def test_a_cache_made_before_pruning_is_upgraded_and_shrinks(server, vid, tmp_path):
    cache = str(tmp_path / "cache")
    options = graft_vfs.Options(autopush=False)
    con = graft_vfs.connect(vid, remote=server.url, cache_dir=cache, options=options)
    make_table(con)
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    holder = graft_vfs.connect(vid, remote=server.url, cache_dir=cache)
    holder.execute("BEGIN")
    assert holder.execute("SELECT count(*) FROM t").fetchone() == (ROWS,)  # keeps history
    for _ in range(20):
        con.execute("UPDATE t SET n = n + 1")
        assert push(con)["pushed"]
    holder.execute("COMMIT")
    con.execute("UPDATE t SET n = n + 1")  # not pushed
    expected = con.execute("SELECT id, n, body FROM t ORDER BY id").fetchall()
    close_clients(holder, con)
    assert cache_rows(cache)[0] > 10 * pages
    # What an earlier graft_vfs left: page data in the rows (no page file), no eviction
    # column, no incremental vacuum.
    assert inline_page_data(cache) > 10 * pages
    db = apsw.Connection(store_file(cache))
    db.execute("ALTER TABLE pages DROP COLUMN used")
    db.execute("PRAGMA journal_mode=DELETE").fetchall()
    db.execute("PRAGMA auto_vacuum=NONE")
    db.execute("VACUUM")
    db.close()
    before = os.path.getsize(store_file(cache))

    con = graft_vfs.connect(vid, remote=server.url, cache_dir=cache, options=options)
    assert con.execute("SELECT id, n, body FROM t ORDER BY id").fetchall() == expected
    assert json.loads(con.execute("PRAGMA graft_status").fetchone()[0])["pending_push"] == 1
    assert push(con)["pushed"]
    assert cache_rows(cache) == (pages, 1)
    db = apsw.Connection(store_file(cache), flags=apsw.SQLITE_OPEN_READONLY)
    assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    assert os.path.getsize(store_file(cache)) <= file_pages_bound(pages) * PAGE_SIZE < before
    close_clients(con)


def test_cache_max_flag_limits_what_the_cache_keeps(server, vid, tmp_path):
    writer = graft_vfs.connect(vid, remote=server.url, cache_dir=str(tmp_path / "w"))
    make_table(writer, rows=80)
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    close_clients(writer)
    cache = str(tmp_path / "cache")
    common = ("--remote", server.url, "--cache", cache)
    bad = graft("hydrate", vid, *common, "--cache-max", "lots", check=False)
    assert bad.returncode != 0 and "--cache-max" in bad.stderr and "is not a size" in bad.stderr
    assert not os.path.exists(cache)  # refused before anything was opened
    done = graft("hydrate", vid, *common, "--cache-max", "32KiB")
    assert done.returncode == 0, done.stderr
    # Every page, but page 1 and the table's root: they came with the opening.
    assert json.loads(done.stdout)["pages_fetched"] == pages - 2
    assert sum(len(lsns) for lsns in cached_pages(cache).values()) == 32 * 1024 // PAGE_SIZE
    query = "SELECT count(*), sum(length(body)) FROM t"
    rows = graft("sql", vid, query, *common, "--cache-max", "0")
    assert rows.returncode == 0, rows.stderr
    assert rows.stdout == f"80|{80 * 1000}\n"
    assert cached_pages(cache) == {}


def test_cache_max_bytes_must_be_a_number_of_bytes():
    with pytest.raises(graft_vfs.InvalidRequest, match="cache_max_bytes=-1: give a number"):
        graft_vfs.Options(cache_max_bytes=-1)


def test_a_limited_cache_follows_a_writer_with_every_row_right(server, vid, tmp_path):
    writer = graft_vfs.connect(
        vid,
        remote=server.url,
        cache_dir=str(tmp_path / "w"),
        options=graft_vfs.Options(autopush=False),
    )
    make_table(writer, rows=80)
    options = graft_vfs.Options(cache_max_bytes=3 * PAGE_SIZE, cache_pages=0, autopush=False)
    cache = str(tmp_path / "r")
    reader = graft_vfs.connect(vid, remote=server.url, cache_dir=cache, options=options)
    query = "SELECT id, n, body FROM t ORDER BY id"
    for i in range(6):
        writer.execute("UPDATE t SET n = n + ? WHERE id % 3 = ?", (i + 1, i % 3))
        assert push(writer)["pushed"]
        assert json.loads(reader.execute("PRAGMA graft_pull").fetchone()[0])["pulled"]
        assert reader.execute(query).fetchall() == writer.execute(query).fetchall()
        assert sum(len(lsns) for lsns in cached_pages(cache).values()) <= 3
    pages = reader.execute("PRAGMA page_count").fetchone()[0]
    page_rows, log_rows = cache_rows(cache)
    assert log_rows == 1 and page_rows <= pages  # one row (data or marker) per page at most
    close_clients(reader, writer)
