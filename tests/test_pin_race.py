"""A reader never meets a snapshot that maintenance compacted under it.

Maintenance (after every pull, push and reset, in any process sharing the cache
directory) keeps only the log from the oldest pinned snapshot on. Three ways a reader
used to read a snapshot nobody had pinned, and failed with SnapshotExpired (or, worse,
kept stale pages):

- SQLite reads the database header as a connection opens, before any lock: that read
  took the process's latest snapshot without pinning it, so a fresh connection's open
  failed when a pull (of this process or another) had compacted the log past it;
- a reload (another process changed the store) that read the store's row before this
  process's own pull committed moved the snapshot back, to an LSN the pull's
  maintenance had just compacted;
- an ``immutable=1`` connection reads the snapshot of its open all its life, but SQLite
  takes no lock on it, so nothing pinned that snapshot.

Each test forces its interleaving with real parts (a second process, or the volume's or
the store's own lock); the last one runs a pulling thread against fresh connections.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid

import apsw
import pytest

import graft_vfs
from support.clients import SqlChild, pragma
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)

BLOB = 5000  # bytes a row: every insert grows the database, so page 1 changes each time
STRESS_SECONDS = 3.0  # how long fresh connections race a pulling thread
BOUND = 10.0  # seconds; a bound on a wait, not a timing


@pytest.fixture
def writer(connect, server, vid, tmp_path):
    """A client on its own cache: ``add()`` commits one growing row and pushes it."""
    con = connect(
        vid,
        remote=server.url,
        cache_dir=str(tmp_path / "writer"),
        options=graft_vfs.Options(autopush=False),
    )
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")

    def add() -> int:
        con.execute("INSERT INTO t(b) VALUES (zeroblob(?))", (BLOB,))
        answer = pragma(con, "graft_push")
        assert answer["pushed"], answer
        return con.execute("SELECT count(*) FROM t").fetchone()[0]

    add()
    return add


@pytest.fixture
def reader(server, tmp_path):
    """A client on the cache ``tmp_path/reader`` (another process may share it)."""
    name = f"pin-race-{uuid.uuid4().hex[:8]}"
    runtime = graft_vfs.register(
        server.url,
        str(tmp_path / "reader"),
        name=name,
        options=graft_vfs.Options(autopush=False),
    )
    yield runtime, name
    graft_vfs.unregister(name)


def count(vid: str, vfs: str) -> int:
    """Open a fresh read-only connection, count the rows, close it."""
    con = apsw.Connection(
        f"file:{vid}", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY, vfs=vfs
    )
    try:
        return con.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        con.close()


def test_a_fresh_connection_opens_after_another_process_compacted(
    writer, reader, server, vid, tmp_path
):
    runtime, name = reader
    vol = runtime.volume(vid, create=False)  # this process's snapshot; nothing read yet
    before = vol.snapshot[0]
    rows = writer()
    other = SqlChild(vid, server.url, str(tmp_path / "reader"))
    try:
        pulled = other.rows("PRAGMA graft_pull")
        assert '"pulled": true' in pulled[0][0]
    finally:
        assert other.close() == 0
    # The other process's maintenance kept nothing before its new snapshot.
    assert runtime.local.settled_floor(vol.row_id) > before == vol.snapshot[0]
    assert count(vid, name) == rows  # the open read the header of the latest snapshot


def test_a_fresh_connection_opens_while_this_process_pulls(writer, reader, vid):
    runtime, name = reader
    vol = runtime.volume(vid, create=False)  # nothing read yet: page 1 is not in memory
    rows = writer()
    got: list[object] = []
    opening = threading.Thread(target=lambda: got.append(_count_or_error(vid, name)))
    store = runtime.local
    with store._lock:  # the store's own lock: the open's first read waits for it
        opening.start()
        deadline = time.monotonic() + BOUND
        while not _in_store(opening) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _in_store(opening)
        # Meanwhile this process pulls: it commits, compacts and advances the snapshot.
        assert vol.sync.pull()["pulled"]
    opening.join(BOUND)
    assert got == [rows]


def _count_or_error(vid: str, vfs: str) -> int | BaseException:
    try:
        return count(vid, vfs)
    except apsw.Error as exc:
        return exc.__cause__ or exc


def _in_store(thread: threading.Thread) -> bool:
    """Whether ``thread`` runs (or waits) in the local store's code."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_filename.endswith(
        ("client/local.py", "client/rows.py", "client/maintenance.py")
    )


def test_a_reload_never_moves_the_snapshot_back(writer, reader, vid):
    runtime, name = reader
    vol = runtime.volume(vid, create=False)
    assert count(vid, name) == 1
    rows = writer()
    late = threading.Thread(target=vol.reload)  # as a catch_up in a reader thread
    with vol.lock:
        late.start()
        # It reads the store's row (the old snapshot), then waits for the lock.
        deadline = time.monotonic() + BOUND
        while not _read_the_row(late) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _read_the_row(late)
        assert vol.sync.pull()["pulled"]  # commits, compacts, advances (the lock is an RLock)
        latest = vol.snapshot
    late.join(BOUND)
    assert vol.snapshot == latest
    assert count(vid, name) == rows


def _read_the_row(thread: threading.Thread) -> bool:
    """Whether ``thread`` is in Volume.reload with the store's row read."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_name == "reload" and "row" in frame.f_locals


def test_an_immutable_connection_keeps_its_snapshot(writer, reader, server, vid, tmp_path):
    runtime, name = reader
    vol = runtime.volume(vid, create=False)
    # SQLite takes no lock on an immutable database: no transaction ever pins it.
    frozen = apsw.Connection(
        f"file:{vid}?immutable=1", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY, vfs=name
    )
    other = SqlChild(vid, server.url, str(tmp_path / "reader"))
    try:
        at_open = vol.snapshot[0]
        for _ in range(3):  # another process pulls: its maintenance keeps what is pinned
            writer()
            assert '"pulled": true' in other.rows("PRAGMA graft_pull")[0][0]
        assert runtime.local.settled_floor(vol.row_id) <= at_open
        assert frozen.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        assert other.close() == 0
        frozen.close()
    assert count(vid, name) == 4


def test_fresh_connections_race_a_pulling_thread(writer, reader, vid):
    runtime, name = reader
    vol = runtime.volume(vid, create=False)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []
    pulls = [0]

    def pull() -> None:
        try:
            while not stop.is_set():
                writer()
                pulls[0] += vol.sync.pull()["pulled"]
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        last = 0
        try:
            while not stop.is_set():
                rows = count(vid, name)
                assert rows >= last, (rows, last)  # never an older snapshot than before
                last = rows
                seen.append(rows)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (pull, read, read)]
    for t in threads:
        t.start()
    time.sleep(STRESS_SECONDS)
    stop.set()
    for t in threads:
        t.join(BOUND)
    assert not errors, errors
    assert pulls[0] >= 5 and len(seen) > pulls[0]
