"""A cache never serves another volume's pages, nor believes a server that goes backwards.

A volume name can come back as another volume (its store wiped and the name created
again) and a cache directory can be pointed at another server. Each volume and store
has an identity; the cache records the one its pages came from and compares it at
open, at every pull and with every page read: a clean cache is refilled from the server,
one with unpushed commits is refused with the fix. Answers out of range, or below the
LSN the cache already has, are refused and change nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import apsw
import msgpack
import pytest
from pyroaring import BitMap

import graft_vfs
from graft_vfs.client.local import FORMAT, STORE_FILE
from graft_vfs.client.remote import Remote
from graft_vfs.client.runtime import Options, Runtime
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import CorruptData, IdentityMismatch, RemoteError
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.identity import Identity
from support.clients import graft, pragma
from support.servers import new_server_process

NO_AUTOPUSH = graft_vfs.Options(autopush=False)
ROWS = 200


def rows(con: apsw.Connection) -> list[tuple]:
    return con.execute("SELECT n, tag FROM t ORDER BY n").fetchall()


def expected(tag: str) -> list[tuple]:
    return [(n, tag) for n in range(1, ROWS + 1)]


def close(con: apsw.Connection) -> None:
    """Close a client for good, as its process exiting would."""
    name = con.open_vfs
    con.close()
    graft_vfs.unregister(name)


def create(url: str, vid: str, cache: str, tag: str, commits: int) -> None:
    """Volume ``vid``: ROWS rows tagged ``tag`` over ``commits`` LSNs, all pushed."""
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache, options=NO_AUTOPUSH)
    con.execute("CREATE TABLE t(n INTEGER PRIMARY KEY, tag TEXT, pad BLOB)")
    con.execute(
        "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < ?) "
        "INSERT INTO t SELECT n, ?, randomblob(500) FROM s",
        (ROWS, tag),
    )
    pragma(con, "graft_push")
    for i in range(commits - 1):
        con.execute("UPDATE t SET pad = randomblob(500) WHERE n % 7 = ?", (i % 7,))
        pragma(con, "graft_push")
    close(con)


def refilled_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cache refilled" in r.getMessage()]


def test_a_wiped_store_and_recreated_name_refill_a_clean_cache(own_server, vid, tmp_path, caplog):
    srv = own_server.start()
    cache = str(tmp_path / "cache")
    create(srv.url, vid, str(tmp_path / "maker-a"), "a", commits=1)
    con = graft_vfs.connect(vid, remote=srv.url, cache_dir=cache)
    assert rows(con) == expected("a")  # every page of volume a is now in the cache
    close(con)
    srv.stop()
    srv.wipe()
    srv.start()
    # The name again, another database, further along than the cache (LSN 3 > 1).
    create(srv.url, vid, str(tmp_path / "maker-b"), "b", commits=3)
    with caplog.at_level(logging.WARNING, logger="graft_vfs"):
        con = graft_vfs.connect(vid, remote=srv.url, cache_dir=cache)
        assert rows(con) == expected("b")
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(refilled_lines(caplog)) == 1
    close(con)


def test_a_pull_from_a_recreated_volume_refills_an_open_cache(own_server, vid, tmp_path, caplog):
    srv = own_server.start()
    create(srv.url, vid, str(tmp_path / "maker-a"), "a", commits=1)
    con = graft_vfs.connect(vid, remote=srv.url, cache_dir=str(tmp_path / "cache"))
    assert rows(con) == expected("a")
    srv.stop()
    srv.wipe()
    srv.start()  # the same URL: the client cannot tell from the address
    create(srv.url, vid, str(tmp_path / "maker-b"), "b", commits=3)
    with caplog.at_level(logging.WARNING, logger="graft_vfs"):
        assert pragma(con, "graft_pull")["remote_lsn"] == 3
    assert len(refilled_lines(caplog)) == 1
    assert rows(con) == expected("b")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    close(con)


@pytest.fixture
def other_server(request, tmp_path, own_server) -> Iterator:
    srv = new_server_process(request, own_server.kind, tmp_path / "other-store")
    yield srv
    srv.stop()


def test_one_cache_dir_pointed_at_two_servers(own_server, other_server, vid, tmp_path):
    first, second = own_server.start(), other_server.start()
    create(first.url, vid, str(tmp_path / "maker-a"), "a", commits=2)
    create(second.url, vid, str(tmp_path / "maker-b"), "b", commits=2)
    cache = str(tmp_path / "cache")
    con = graft_vfs.connect(vid, remote=first.url, cache_dir=cache)
    assert rows(con) == expected("a")
    close(con)
    con = graft_vfs.connect(vid, remote=second.url, cache_dir=cache)
    assert rows(con) == expected("b")  # same name, same LSN: only the identity tells
    close(con)
    con = graft_vfs.connect(vid, remote=first.url, cache_dir=cache)
    assert rows(con) == expected("a")
    close(con)


def test_a_dirty_cache_of_another_volume_is_refused_with_the_fix(own_server, vid, tmp_path):
    srv = own_server.start()
    cache = str(tmp_path / "cache")
    create(srv.url, vid, cache, "a", commits=1)
    old = Remote(srv.url).snapshot(vid).identity
    con = graft_vfs.connect(vid, remote=srv.url, cache_dir=cache, options=NO_AUTOPUSH)
    con.execute("UPDATE t SET tag = 'local' WHERE n = 1")  # committed locally, not pushed
    close(con)
    srv.stop()
    srv.wipe()
    srv.start()
    # At LSN 1, where the cache's commit is based: without identities it would land on b.
    create(srv.url, vid, str(tmp_path / "maker-b"), "b", commits=1)
    new = Remote(srv.url).snapshot(vid).identity
    assert old is not None and new is not None and old != new

    con = graft_vfs.connect(vid, remote=srv.url, cache_dir=cache, options=NO_AUTOPUSH)
    for name in ("graft_push", "graft_pull"):
        with pytest.raises(apsw.Error) as info:
            pragma(con, name)
        message = str(info.value)
        for part in (repr(vid), old.volume_id.hex(), new.volume_id.hex(), "graft reset --force"):
            assert part in message, (part, message)
    assert rows(con)[0] == (1, "local")  # the cache's own data stays readable
    close(con)
    server = graft_vfs.connect(vid, remote=srv.url, cache_dir=str(tmp_path / "check"))
    assert rows(server) == expected("b") and Remote(srv.url).snapshot(vid).lsn == 1
    close(server)

    plain = graft("reset", vid, "--remote", srv.url, "--cache", cache, check=False)
    assert plain.returncode == 1 and "graft reset --force" in plain.stderr
    forced = graft("reset", vid, "--remote", srv.url, "--cache", cache, "--force", check=False)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["discarded_commits"] == 1
    con = graft_vfs.connect(vid, remote=srv.url, cache_dir=cache)
    assert rows(con) == expected("b")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    close(con)


def test_reads_and_commits_for_another_identity_are_refused(server, vid, tmp_path):
    create(server.url, vid, str(tmp_path / "maker"), "a", commits=1)
    remote = Remote(server.url)
    real = remote.snapshot(vid).identity
    assert real is not None
    other = Identity(real.store_id, bytes(16))
    assert remote.read_pages(vid, 1, [0], identity=real)[0][0] == 1
    with pytest.raises(IdentityMismatch, match=real.volume_id.hex()):
        remote.read_pages(vid, 1, [0], identity=other)
    pages = {0: remote.read_pages(vid, 1, [0])[0][1]}
    with pytest.raises(IdentityMismatch):
        remote.commit(vid, 1, 1, pages, commit_hash(vid, 1, 1, pages.items()), identity=other)
    assert remote.snapshot(vid).lsn == 1  # nothing was committed
    remote.close()


def test_a_cache_from_before_identities_takes_the_servers_at_first_contact(server, vid, tmp_path):
    cache = str(tmp_path / "cache")
    create(server.url, vid, cache, "a", commits=1)
    db = apsw.Connection(os.path.join(cache, STORE_FILE))
    db.execute("DROP TABLE origins; PRAGMA user_version=1")
    db.close()
    con = graft_vfs.connect(vid, remote=server.url, cache_dir=cache)
    assert rows(con) == expected("a")
    close(con)
    db = apsw.Connection(os.path.join(cache, STORE_FILE))
    assert db.execute("PRAGMA user_version").fetchone() == (FORMAT,)
    identity = Remote(server.url).snapshot(vid).identity
    assert identity is not None
    stored = db.execute("SELECT store_id, volume_id FROM origins").fetchall()
    assert stored == [(identity.store_id, identity.volume_id)]
    db.close()


# -- a fake server, over real HTTP, that answers what a real one never would ----------

IDENTITY = {"store_id": b"s" * 16, "volume_id": b"v" * 16}


class FakeServer:
    """Answers a snapshot at LSN 5 of 2 pages, and whatever ``pull_answer`` says to pulls."""

    def __init__(self) -> None:
        self.pull_answer: dict = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def answer(self, body: dict) -> None:
                data = msgpack.packb(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-msgpack")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.answer({"vid": "fake", "lsn": 5, "page_count": 2, **IDENTITY})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.answer(fake.pull_answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def huge_graft() -> bytes:
    bm = BitMap(range(1 << 24))
    bm.run_optimize()
    return bm.serialize()  # 16M pages in a few bytes


@pytest.mark.parametrize(
    "answer, error, says",
    [
        ({"lsn": 3, "page_count": 2, "graft": b""}, RemoteError, "is at LSN 3 of 'fake', behind"),
        ({"lsn": 6, "page_count": 2, "graft": huge_graft()}, CorruptData, "beyond its page count"),
        ({"lsn": 6, "page_count": MAX_PAGES + 1, "graft": b""}, CorruptData, "'page_count'"),
        ({"lsn": -1, "page_count": 2, "graft": b""}, CorruptData, "'lsn'"),
        ({"lsn": 6, "page_count": True, "graft": b""}, CorruptData, "'page_count'"),
        ({"lsn": 6, "page_count": 2, "graft": b"junk"}, CorruptData, "malformed graft"),
    ],
)
def test_a_pull_answer_out_of_range_is_refused_and_writes_nothing(
    fake, tmp_path, answer, error, says
):
    runtime = Runtime(fake.url, str(tmp_path / "cache"), Options(autopush=False))
    try:
        vol = runtime.volume("fake", create=False)
        before = vol.refresh()
        store = apsw.Connection(os.path.join(str(tmp_path / "cache"), STORE_FILE))
        counts = store.execute("SELECT (SELECT count(*) FROM pages), (SELECT count(*) FROM log)")
        counted = counts.fetchone()
        fake.pull_answer = {"vid": "fake", **answer, **IDENTITY}
        with pytest.raises(error, match=says):
            vol.sync.pull()
        assert vol.refresh() == before
        again = store.execute("SELECT (SELECT count(*) FROM pages), (SELECT count(*) FROM log)")
        assert again.fetchone() == counted
        store.close()
    finally:
        runtime.close()
