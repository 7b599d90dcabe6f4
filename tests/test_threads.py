"""Threads of one process, each with its own connection on one cache: isolation holds.

Writers increment a counter in every row in one transaction while long readers check
that their snapshot stays put (and that the counters agree), with background push
and background pull on. Another client on its own cache pulls in the background
until it sees every increment.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import apsw
import pytest

import graft_vfs

WRITERS = 4
READERS = 2
INCREMENTS = 25  # per writer
READS_PER_SNAPSHOT = 20
ROWS = 40  # two a page: each commit rewrites ~20 pages, more than a reader's page cache
SYNC = graft_vfs.Options(autopush=True, pull_interval=0.05)
PROGRESS_BOUND = 60.0  # seconds; a bound on a wait, not a timing


class Commits:
    """How many increments have been committed so far, across the writer threads."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


def counters(con: apsw.Connection) -> list[int]:
    """The smallest and the largest counter (every increment moves them all)."""
    return list(con.execute("SELECT min(n), max(n) FROM c").fetchone())


def test_threads_with_their_own_connections_keep_isolation(connect, server, vid, tmp_path):
    cache = str(tmp_path / "cache")
    setup = connect(vid, remote=server.url, cache_dir=cache, options=SYNC)
    setup.execute("CREATE TABLE c(id INTEGER PRIMARY KEY, n INTEGER, pad BLOB)")
    setup.executemany("INSERT INTO c VALUES (?, 0, randomblob(1500))", ((i,) for i in range(ROWS)))
    commits = Commits()
    writers_done = threading.Event()
    go = threading.Barrier(WRITERS + READERS)
    spanned_once = [threading.Event() for _ in range(READERS)]

    def writer() -> tuple[int, int]:
        """Increments and BUSY refusals: it goes on until every reader saw a commit."""
        con = connect(vid, remote=server.url, cache_dir=cache, options=SYNC)
        go.wait()
        done = busy = 0
        deadline = time.monotonic() + PROGRESS_BOUND
        while done < INCREMENTS or not all(e.is_set() for e in spanned_once):
            assert time.monotonic() < deadline, "a reader never held a snapshot across a commit"
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("UPDATE c SET n = n + 1")
                con.execute("COMMIT")
            except apsw.BusyError:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                busy += 1
                time.sleep(0.001)
                continue
            done += 1
            commits.add()
        return done, busy

    def reader(k: int) -> int:
        """Snapshots held while another thread committed (the check had something to see)."""
        con = connect(vid, remote=server.url, cache_dir=cache, options=SYNC)
        # SQLite's smallest page cache: each scan reads most pages again from the VFS.
        con.execute("PRAGMA cache_size = 1")
        go.wait()
        spanned = 0
        while not writers_done.is_set():
            with con:  # one read transaction: one snapshot
                first = counters(con)
                assert first[0] == first[1], f"a half-applied increment: {first}"
                before = commits.count
                for _ in range(READS_PER_SNAPSHOT):
                    time.sleep(0.001)
                    assert counters(con) == first, "a snapshot moved under its reader"
                if commits.count > before:
                    spanned += 1
                    spanned_once[k].set()
        return spanned

    with ThreadPoolExecutor(WRITERS + READERS) as pool:
        readers = [pool.submit(reader, k) for k in range(READERS)]
        writers = [pool.submit(writer) for _ in range(WRITERS)]
        try:
            done, busy = zip(*(w.result(timeout=2 * PROGRESS_BOUND) for w in writers))
        finally:
            writers_done.set()
        spanned = [r.result(timeout=PROGRESS_BOUND) for r in readers]
    total = sum(done)
    print(f"threads: increments {done}, BUSY {busy}, snapshots spanning a commit {spanned}")
    assert min(done) >= INCREMENTS and sum(busy) > 0, "the writers never contended"
    assert all(n > 0 for n in spanned)
    assert counters(setup) == [total, total]

    # Background push delivers every commit; another client's background pull sees them.
    observer = connect(vid, remote=server.url, cache_dir=str(tmp_path / "other"), options=SYNC)
    deadline = time.monotonic() + PROGRESS_BOUND
    while counters(observer) != [total, total]:
        if time.monotonic() > deadline:
            pytest.fail(f"another client saw {counters(observer)}, not {total} twice")
        time.sleep(0.05)
    assert observer.execute("PRAGMA integrity_check").fetchone() == ("ok",)
