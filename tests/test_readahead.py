"""Read-ahead for sequential readers (graft_vfs/client/readahead.py): unit tests of the
windows and marks, then a real server: a cold scan keeps windows in flight, returns
what native SQLite returns, and a window that lands after a commit serves nothing old."""

from __future__ import annotations

import random
import threading
import time

import apsw
import pytest

import graft_vfs
from graft_vfs.client import readahead
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.local import LocalStore
from graft_vfs.client.readahead import ReadAhead
from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import StorageError
from support.clients import pragma

# -- the windows alone (a fake fetch) -------------------------------------------------


class FakeFetch:
    """Records the windows asked for; each waits for ``gate`` before it lands."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[tuple[list[int], int]] = []
        self.gate = threading.Event()
        self.fail = fail

    def __call__(self, pages: list[int], lsn: int):
        self.asked.append((pages, lsn))
        self.gate.wait(10)
        if self.fail:
            raise StorageError("the server went away")
        return [(p, lsn, bytes([p % 256]) * 4096) for p in pages[: readahead.MARK_PAGES]]


def settle(ahead: ReadAhead) -> None:
    deadline = time.monotonic() + 10
    while ahead._flying and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not ahead._flying


def test_a_start_puts_depth_windows_in_flight_each_twice_as_long():
    fetch = FakeFetch()
    ahead = ReadAhead(fetch)
    ahead.start(last=99, stride=1, size=8, lsn=5, page_count=10_000)
    fetch.gate.set()
    settle(ahead)
    assert [(p[0], len(p), lsn) for p, lsn in fetch.asked] == [(100, 8, 5), (108, 16, 5)][
        : readahead.DEPTH
    ]


def test_windows_stop_at_the_page_count_and_follow_a_backward_stride():
    fetch = FakeFetch()
    fetch.gate.set()
    ahead = ReadAhead(fetch)
    ahead.start(last=995, stride=1, size=64, lsn=1, page_count=1000)
    settle(ahead)
    assert fetch.asked[0][0] == [996, 997, 998, 999]
    assert len(fetch.asked) == 1  # nothing after the last page
    fetch.asked.clear()
    ahead.start(last=10, stride=-2, size=8, lsn=1, page_count=1000)
    settle(ahead)
    assert fetch.asked[0][0] == [8, 6, 4, 2, 0]


def test_a_read_in_a_window_in_flight_waits_for_it_then_its_mark_starts_the_next():
    fetch = FakeFetch()
    ahead = ReadAhead(fetch)
    ahead.start(last=99, stride=1, size=8, lsn=5, page_count=10_000)
    waited = threading.Event()

    def reader() -> None:
        ahead.wait(103, 5)
        waited.set()

    threading.Thread(target=reader).start()
    assert not waited.wait(0.2)  # the window has not landed
    ahead.wait(5000, 5)  # a page in no window does not wait
    ahead.wait(103, 6)  # nor a read of another snapshot
    fetch.gate.set()
    assert waited.wait(5)
    settle(ahead)
    launched = len(fetch.asked)
    assert ahead.take_mark(100, 6) is None  # another snapshot's read: not its mark
    ahead.start(last=99, stride=1, size=8, lsn=5, page_count=10_000)  # marks come back
    settle(ahead)
    fetch.asked.clear()
    row_lsn, data = ahead.take_mark(100, 5)
    assert (row_lsn, data[:1]) == (5, bytes([100]))
    settle(ahead)
    # the next window starts after the last one started, twice as long
    front = 100 + 8 + 16 if readahead.DEPTH == 2 else 108
    assert fetch.asked and fetch.asked[0][0][0] == front
    assert launched >= readahead.DEPTH
    assert ahead.take_mark(100, 5) is None  # a mark is served once
    fetch.asked.clear()
    assert ahead.take_mark(101, 5)[1][:1] == bytes([101])  # another mark of the window
    settle(ahead)
    assert not fetch.asked  # starts nothing: the window already started its next


def test_a_failed_window_releases_its_readers_and_leaves_no_mark():
    fetch = FakeFetch(fail=True)
    ahead = ReadAhead(fetch)
    ahead.start(last=0, stride=1, size=4, lsn=2, page_count=100)
    fetch.gate.set()
    ahead.wait(2, 2)
    settle(ahead)
    assert ahead.take_mark(1, 2) is None
    assert not ahead.busy()


# -- a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_db(tmp_path_factory):
    """A table of about 2,500 pages (10 MB) and an index on it."""
    path = str(tmp_path_factory.mktemp("scan") / "scan.db")
    db = apsw.Connection(path)
    db.execute("PRAGMA journal_mode=DELETE")
    with db:
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT)")
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30000) "
            "INSERT INTO t SELECT i, (i * 7919) % 30011, printf('%0300d', i) FROM n"
        )
        db.execute("CREATE INDEX t_k ON t(k)")
    db.close()
    return path


@pytest.fixture
def scan_volume(scan_db, server, vid):
    import_database(Remote(server.url), scan_db, vid)
    return vid


SCAN = "SELECT count(*), sum(k), sum(length(v)), max(v) FROM t"


def test_a_cold_scan_keeps_windows_in_flight_and_returns_native_rows(
    client, scan_volume, scan_db, monkeypatch
):
    monkeypatch.setenv("GRAFT_DIRECT", "0")  # count requests to the server
    native = apsw.Connection(scan_db, flags=apsw.SQLITE_OPEN_READONLY)
    con = client(scan_volume)
    assert con.execute(SCAN).fetchall() == native.execute(SCAN).fetchall()
    stats = pragma(con, "graft_stats")
    assert stats["pages_fetched"] > 2000
    assert stats["readahead_windows"] >= 5, stats
    assert stats["requests"] < stats["pages_fetched"] / 20, stats
    # what was fetched ahead was read: at most two windows' worth is left over
    assert stats["prefetch_unused"] <= 2 * readahead.MAX_WINDOW, stats
    # and the scan again is local: nothing more crosses the link
    assert con.execute(SCAN).fetchall() == native.execute(SCAN).fetchall()
    assert pragma(con, "graft_stats")["requests"] == stats["requests"]
    native.close()


def test_a_window_that_lands_after_a_pull_serves_nothing_old(client, scan_volume):
    """A window fetched for snapshot S lands after a pull moved the reader past a commit
    that rewrote its pages: the reader of the new snapshot gets the new rows."""
    con = client(scan_volume)
    assert con.execute("SELECT count(*) FROM t WHERE id < 50").fetchone() == (49,)
    vol = graft_vfs.runtime_of(con.open_vfs).volume(scan_volume, create=False)
    reads, remote = vol.reads, vol.reads.remote
    real_read = remote.read_pages
    fetched, release = threading.Event(), threading.Event()

    def slow_read(*args, **kwargs):
        got = real_read(*args, **kwargs)
        if threading.current_thread().name == "graft-read-ahead":
            fetched.set()
            release.wait(10)  # off the wire, not in any cache yet
        return got

    remote.read_pages = slow_read
    try:
        page_count = pragma(con, "graft_status")["page_count"]
        reads.ahead.start(1199, 1, 256, reads._latest(), page_count)  # leaves of t
        assert fetched.wait(10)
        writer = client(scan_volume)
        writer.execute("UPDATE t SET v = 'new' || id")
        pragma(writer, "graft_push")
        assert pragma(con, "graft_pull")["pulled"]
        release.set()
        settle(reads.ahead)
        assert con.execute("SELECT count(*), sum(v LIKE 'new%') FROM t").fetchone() == (
            30000,
            30000,
        )
    finally:
        release.set()
        remote.read_pages = real_read


@pytest.mark.stores("fs")
def test_without_data_answers_as_missing_pages_for_any_set_of_pages(
    client, scan_volume, tmp_path
):
    """The demand path asks the local store which pages it lacks in one query per batch
    (``without_data``): the same answer as the whole-snapshot ``missing_pages``, for
    runs and scattered sets, before and after a pull left markers."""
    cache = str(tmp_path / "reader")
    con = client(scan_volume, cache=cache)
    con.execute("SELECT count(*) FROM t WHERE id < 8000").fetchall()
    writer = client(scan_volume)
    writer.execute("UPDATE t SET v = 'x' WHERE id % 97 = 0")
    pragma(writer, "graft_push")
    assert pragma(con, "graft_pull")["pulled"]
    con.close()
    store = LocalStore(cache)
    try:
        row = store.load_volume(scan_volume)
        assert row is not None
        v = row.row_id
        rng = random.Random(4)
        for lsn in range(1, row.local_lsn + 1):
            count = store.page_count_at(v, lsn)
            whole = store.missing_pages(v, lsn, count)
            markers = [p for p, m in whole.items() if m is not None]
            held = [p for p in range(count) if p not in whole]
            if lsn == row.local_lsn:  # the snapshot read: some pages held, markers left
                assert held and markers
            sets = [
                list(range(count)),  # dense: range queries
                rng.sample(range(count), min(700, count)),  # scattered: IN lists
                held[:50] + markers[:50],
                [],
            ]
            for pages in sets:
                assert store.without_data(v, pages, lsn) == {
                    p: whole[p] for p in sorted(pages) if p in whole
                }
    finally:
        store.close()
