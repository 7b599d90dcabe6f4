"""graft_vfs.Volume: pages and byte ranges of data that is not SQLite, on a real server.

Everything runs against a real ``graft server`` (a directory store and SeaweedFS's S3)
with real clients, each its own cache directory: writes and reads of pages and ranges,
atomic commits, push and pull between clients, snapshots at past LSNs, the lazy read
of 1% of a multi-megabyte file (counted by the client's own counters), a damaged
answer refused, the writer lock shared with SQL connections, and bad input refused.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import apsw
import pytest

import graft_vfs
from graft_vfs.core.errors import (
    Busy,
    CorruptData,
    InvalidRequest,
    ReadOnly,
    SnapshotNotFound,
    VolumeNotFound,
)
from graft_vfs.core.ids import PAGE_SIZE
from support.tamper import Fetch, TamperingProxy

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.fixture
def open_volume(tmp_path, server):
    """Volume.open on the session's server, each call with a cache of its own by default;
    every client it made is unregistered afterwards."""
    made: list[graft_vfs.Volume] = []

    def make(name: str, *, cache: str | None = None, **kwargs) -> graft_vfs.Volume:
        kwargs.setdefault("remote", server.url)
        cache_dir = cache or str(tmp_path / f"cache{len(made)}")
        made.append(graft_vfs.Volume.open(name, cache_dir=cache_dir, **kwargs))
        return made[-1]

    yield make
    for vol in made:
        vol.close()
    for name in {vol.client_name for vol in made}:
        graft_vfs.unregister(name)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ at every offset in a run of pages (no two pages equal)."""
    block = bytes((i * 7 + seed) % 251 for i in range(251 * 16))
    out = (block * (n // len(block) + 1))[:n]
    return bytes(out)


def test_pages_and_byte_ranges_read_back(open_volume, vid) -> None:
    vol = open_volume(vid)
    assert (vol.lsn, vol.page_count, vol.size) == (0, 0, 0)
    assert vol.read(0, 100) == b""  # an empty volume: a short read, as from a file
    page = pattern(PAGE_SIZE, 1)
    data = pattern(3 * PAGE_SIZE + 100, 2)
    with vol.write() as w:
        w.write_page(0, page)
        w.write(PAGE_SIZE - 10, data)  # across 5 pages, the first and last partly
        assert w.read(PAGE_SIZE - 10, len(data)) == data  # it reads its own writes
        assert w.page_count == 5
        assert vol.page_count == 0  # nothing visible before the commit
    assert w.committed and w.lsn == vol.lsn == 1
    assert vol.page_count == 5 and vol.size == 5 * PAGE_SIZE
    assert vol.read_page(0) == page[: PAGE_SIZE - 10] + data[:10]
    assert vol.read(PAGE_SIZE - 10, len(data)) == data
    assert vol.read(PAGE_SIZE, 1) == data[10:11]
    tail = vol.read(4 * PAGE_SIZE, 2 * PAGE_SIZE)  # past the end: short
    assert tail == data[-90:] + bytes(PAGE_SIZE - 90)  # the data ends 90 bytes into page 4
    assert len(tail) == PAGE_SIZE
    assert vol.read(5 * PAGE_SIZE, 10) == b"" and vol.read(10**9, 10) == b""
    with pytest.raises(InvalidRequest, match="past the end of the volume"):
        vol.read_page(5)
    # Writing past the end grows the volume with zero pages in between.
    with vol.write() as w:
        w.write(8 * PAGE_SIZE + 1, b"xyz")
    assert vol.page_count == 9
    assert vol.read_page(6) == bytes(PAGE_SIZE)
    assert vol.read(8 * PAGE_SIZE, 5) == b"\0xyz\0"
    # A transaction that writes pages back as they were commits nothing.
    with vol.write() as w:
        w.write_page(0, vol.read_page(0))
    assert not w.committed and w.lsn == vol.lsn == 2


def test_truncate_shrinks_and_grows_in_whole_pages(open_volume, vid) -> None:
    vol = open_volume(vid)
    with vol.write() as w:
        w.write(0, pattern(4 * PAGE_SIZE))
    with vol.write() as w:
        w.truncate(PAGE_SIZE + 10)  # two pages, the second zero from byte 10 on
        assert w.page_count == 2
        w.truncate(3 * PAGE_SIZE)  # grown again: zeros, not the old third page
        assert w.read_page(2) == bytes(PAGE_SIZE)
    assert vol.page_count == 3
    assert vol.read(0, PAGE_SIZE + 10) == pattern(PAGE_SIZE + 10)
    assert vol.read(PAGE_SIZE + 10, 2 * PAGE_SIZE - 10) == bytes(2 * PAGE_SIZE - 10)
    with vol.write() as w:
        w.truncate(0)
    assert (vol.page_count, vol.read(0, 10)) == (0, b"")


def test_a_failed_write_commits_nothing_and_frees_the_writer(open_volume, vid) -> None:
    vol = open_volume(vid)
    with vol.write() as w:
        w.write(0, b"a" * PAGE_SIZE * 2)
    before = (vol.lsn, vol.read(0, 2 * PAGE_SIZE))
    with pytest.raises(RuntimeError, match="half way"):
        with vol.write() as w:
            w.write_page(0, b"b" * PAGE_SIZE)
            w.write(10 * PAGE_SIZE, b"grown")
            raise RuntimeError("half way")
    assert (vol.lsn, vol.read(0, 2 * PAGE_SIZE)) == before and vol.page_count == 2
    with pytest.raises(InvalidRequest, match="inside `with vol.write"):
        w.write(0, b"late")  # the ended transaction takes nothing more
    with vol.write(timeout=0) as w2:  # the writer lock was released
        w2.write(0, b"c")
    assert vol.read(0, 2) == b"ca"


def test_push_and_pull_between_two_clients(open_volume, vid) -> None:
    opts = graft_vfs.Options(autopush=False)
    a = open_volume(vid, options=opts)
    with a.write() as w:
        w.write(0, pattern(10 * PAGE_SIZE, 3))
    pushed = a.push()
    assert pushed["pushed"] and pushed["remote_lsn"] == 1 == a.remote_lsn
    b = open_volume(vid, create=False)
    assert b.remote_lsn == 1 and b.read(0, 10 * PAGE_SIZE) == pattern(10 * PAGE_SIZE, 3)
    with b.write() as w:
        w.write(5 * PAGE_SIZE + 7, b"from b")
    assert b.push()["remote_lsn"] == 2
    assert a.read(5 * PAGE_SIZE + 7, 6) != b"from b"  # until a pulls
    pulled = a.pull()
    assert pulled["pulled"] and pulled["changed_pages"] == 1
    assert a.read(5 * PAGE_SIZE + 7, 6) == b"from b" and a.remote_lsn == 2


def test_snapshots_at_past_lsns_from_the_cache_and_from_the_server(open_volume, vid) -> None:
    a = open_volume(vid, options=graft_vfs.Options(autopush=False))
    body = pattern(298 * PAGE_SIZE, 6)
    for version in range(3):  # server LSNs 1, 2, 3: page 1 says which
        with a.write() as w:
            w.write(PAGE_SIZE, b"version %d" % version)
            if not version:
                w.write(2 * PAGE_SIZE, body)  # pages 2 to 299
        a.push()
    with a.snapshot(1) as old:
        assert (old.lsn, old.page_count) == (1, 300)
        assert old.read(PAGE_SIZE, 9) == b"version 0"
        with pytest.raises(ReadOnly, match="snapshot is read-only"):
            old.write()
    # A snapshot of the latest stays as it was while the volume moves on.
    latest = a.snapshot()
    assert latest.lsn == 3
    with a.write() as w:
        w.write(PAGE_SIZE, b"version 9")
    assert latest.read(PAGE_SIZE, 9) == b"version 2" and a.read(PAGE_SIZE, 9) == b"version 9"
    assert a.snapshot().lsn is None  # a local commit not pushed has no server LSN yet
    latest.close()
    with pytest.raises(InvalidRequest, match="snapshot is closed"):
        latest.read(0, 1)
    # A fresh client has none of the history locally: LSN 2's pages come from the server.
    b = open_volume(vid)
    opened = b.stats()["pages_fetched"]  # page 0, with the snapshot (the opening)
    old = b.snapshot(2)
    assert old.read(PAGE_SIZE, 9) == b"version 1"
    assert b.stats()["pages_fetched"] - opened == 1
    before = b.stats()
    assert old.read(0, 300 * PAGE_SIZE)[2 * PAGE_SIZE :] == body
    after = b.stats()
    # The other 299 pages, in requests of up to 256 pages, not one request per page.
    assert after["pages_fetched"] - before["pages_fetched"] == 299
    assert after["requests"] - before["requests"] == 2
    assert old.read(PAGE_SIZE, 9) == b"version 1" and b.stats()["requests"] == after["requests"]
    with pytest.raises(SnapshotNotFound, match="no LSN 99"):
        b.snapshot(99)


def test_reading_one_percent_of_a_large_file_fetches_about_one_percent(open_volume, vid) -> None:
    size = 8 * 1024 * 1024  # 2048 pages
    data = os.urandom(size)
    writer = open_volume(vid, options=graft_vfs.Options(autopush=False))
    with writer.write() as w:
        w.write(0, data)
    writer.push()
    reader = open_volume(vid)
    offset, length = size // 3 + 123, size // 100
    assert reader.read(offset, length) == data[offset : offset + length]
    stats = reader.stats()
    wanted = length // PAGE_SIZE + 2
    # About 1%: the pages read and what the prefetch adds (29 measured on loopback; the
    # bound leaves room for frames sized by a slower link).
    assert wanted <= stats["pages_fetched"] <= 4 * wanted, stats
    assert stats["bytes_fetched"] < size // 20, stats  # under 5% of the file
    # Read again: from the cache, nothing more fetched.
    assert reader.read(offset, length) == data[offset : offset + length]
    assert reader.stats()["pages_fetched"] == stats["pages_fetched"]


def flip_byte(answer: dict, path: str, fetch: Fetch) -> dict:
    row = answer["pages"][0]
    frame = bytearray(row[3])
    frame[len(frame) // 2] ^= 0x01
    row[3] = bytes(frame)
    return answer


@pytest.mark.stores("fs")
def test_a_damaged_page_from_the_server_is_refused(open_volume, vid, server) -> None:
    writer = open_volume(vid, options=graft_vfs.Options(autopush=False))
    with writer.write() as w:
        w.write(0, pattern(4 * PAGE_SIZE, 5))
    writer.push()
    with TamperingProxy(server.url) as proxy:
        reader = open_volume(vid, remote=proxy.url)  # its opening passes unchanged
        proxy.rewrite = flip_byte
        with pytest.raises(CorruptData, match="checksum mismatch"):
            reader.read(2 * PAGE_SIZE, 10)
        assert proxy.rewritten == 1
        proxy.rewrite = None  # honest again: the page was not kept, so it is fetched again
        assert reader.read(2 * PAGE_SIZE, 10) == pattern(4 * PAGE_SIZE, 5)[2 * PAGE_SIZE :][:10]


def test_the_writer_lock_is_shared_with_sql_connections(open_volume, connect, vid, tmp_path):
    cache = str(tmp_path / "shared")
    vol = open_volume(vid, cache=cache)
    con = connect(vid, remote=vol._runtime.remote.url, cache_dir=cache)
    assert con.open_vfs == vol.client_name  # the same client as connect()'s
    con.execute("BEGIN IMMEDIATE")  # a SQL write transaction holds the writer lock
    with pytest.raises(Busy, match="another writer"):
        with vol.write(timeout=0.05):
            pass
    con.execute("ROLLBACK")
    with vol.write() as w:
        with pytest.raises(apsw.BusyError):
            con.execute("BEGIN IMMEDIATE")
        w.write(0, b"DATA")
    assert vol.read(0, 4) == b"DATA"
    # The bytes are no SQLite database: SQL says so, as on any such file.
    with pytest.raises(apsw.NotADBError):
        con.execute("SELECT * FROM sqlite_schema").fetchall()


def test_each_read_sees_one_snapshot_while_a_writer_commits(open_volume, vid) -> None:
    vol = open_volume(vid, remote="")  # local only: this is about the cache
    pages = 8
    with vol.write() as w:
        w.write(0, bytes(pages * PAGE_SIZE))
    torn: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = vol.read(0, pages * PAGE_SIZE)
            if len(set(data)) != 1:
                torn.append(data)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 40):  # each commit rewrites every page with one byte
            with vol.write() as w:
                for pageno in range(pages):
                    w.write_page(pageno, bytes([version]) * PAGE_SIZE)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not torn and vol.read(0, pages * PAGE_SIZE) == bytes([39]) * pages * PAGE_SIZE


CHILD_WRITER = """
import sys, graft_vfs
vol = graft_vfs.Volume.open(sys.argv[1], remote=sys.argv[2], cache_dir=sys.argv[3])
with vol.write() as w:
    w.write(0, b"from the child")
    print("writing", flush=True)
    sys.stdin.readline()
print(w.lsn, flush=True)
"""


def test_a_writer_in_another_process_excludes_this_one(open_volume, vid, tmp_path) -> None:
    cache = str(tmp_path / "shared")
    vol = open_volume(vid, cache=cache)
    with vol.write() as w:
        w.write(0, b"from the parent")
    remote = vol._runtime.remote.url
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_WRITER, vid, remote, cache],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "writing\n"
        with pytest.raises(Busy, match="another writer"):
            with vol.write(timeout=0.2):
                pass
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "2\n"  # the child's commit, local LSN 2
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
    assert vol.read(0, 15) == b"from the childt" and vol.lsn == 2  # seen from the cache
    with vol.write(timeout=0) as w:  # and the lock is free again
        w.write(0, b"parent again")


def test_rebase_lands_writes_to_other_pages_and_refuses_a_read_that_changed(
    open_volume, vid
) -> None:
    opts = graft_vfs.Options(autopush=False, rebase=True)
    a = open_volume(vid, options=opts)
    with a.write() as w:
        w.write(0, pattern(10 * PAGE_SIZE, 7))
    a.push()
    b = open_volume(vid, options=opts)
    with a.write() as w:
        w.write_page(3, b"a" * PAGE_SIZE)
    with b.write() as w:
        w.write(7 * PAGE_SIZE + 5, b"b")  # reads page 7, writes it
    a.push()
    assert b.push()["pushed"] and b.stats()["rebases"] == 1
    assert b.read(3 * PAGE_SIZE, 1) == b"a" and b.read(7 * PAGE_SIZE + 5, 1) == b"b"
    # b reads page 3, which a changes meanwhile: not serializable, so not rebased.
    a.pull()
    with a.write() as w:
        w.write_page(3, b"A" * PAGE_SIZE)
    with b.write() as w:
        w.write_page(8, w.read_page(3))
    a.push()
    with pytest.raises(graft_vfs.Diverged, match="page 3, which a local transaction read"):
        b.push()


def test_bad_input_is_refused_with_what_to_do(open_volume, vid, tmp_path) -> None:
    vol = open_volume(vid)
    with vol.write() as w:
        w.write(0, b"x" * PAGE_SIZE)
        for bad in (b"short", b"x" * (PAGE_SIZE + 1)):
            with pytest.raises(InvalidRequest, match=f"a page is {PAGE_SIZE} bytes"):
                w.write_page(1, bad)
        with pytest.raises(InvalidRequest, match="takes bytes"):
            w.write(0, "text")  # type: ignore[arg-type]
        for offset in (-1, True, 1.5):
            with pytest.raises(InvalidRequest, match="offset"):
                w.write(offset, b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="past the largest volume"):
            w.write(2**43, b"x")
        with pytest.raises(InvalidRequest, match="size"):
            w.truncate(-1)
        with pytest.raises(InvalidRequest, match="page -1"):
            w.write_page(-1, b"x" * PAGE_SIZE)
    for offset, length in ((-1, 1), (0, -1)):
        with pytest.raises(InvalidRequest, match="give an integer >= 0"):
            vol.read(offset, length)
    with pytest.raises(InvalidRequest, match="page 'a'"):
        vol.read_page("a")  # type: ignore[arg-type]
    with pytest.raises(SnapshotNotFound, match="integer >= 0"):
        vol.snapshot(-1)
    with pytest.raises(InvalidRequest, match="timeout"):
        vol.write(timeout=-1)
    w = vol.write()
    with w:
        pass
    with pytest.raises(InvalidRequest, match="runs once"):
        with w:
            pass
    with pytest.raises(VolumeNotFound, match="create=True"):
        open_volume(f"{vid}-absent", create=False)
    with pytest.raises(graft_vfs.InvalidVolumeId):
        open_volume("../escape")
    vol.close()
    with pytest.raises(InvalidRequest, match="is closed"):
        vol.read(0, 1)


def test_a_local_only_volume_reads_and_writes(tmp_path) -> None:
    vol = graft_vfs.Volume.open("scratch", remote="", cache_dir=str(tmp_path / "local"))
    try:
        with vol.write() as w:
            w.write(0, b"local bytes")
        assert vol.read(0, 11) == b"local bytes" and vol.lsn == 1
        with pytest.raises(InvalidRequest, match="no graft server configured"):
            vol.push()
    finally:
        vol.close()
        graft_vfs.unregister(vol.client_name)


def test_readme_volume_example_runs(server, tmp_path) -> None:
    with open(README) as f:
        section = f.read().split("## Volumes for data that is not SQLite\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("http://127.0.0.1:3000", server.url)
    code = code.replace("/tmp/writer-cache", str(tmp_path / "w"))
    code = code.replace("/tmp/reader-cache", str(tmp_path / "r"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["1 5121 1", "b'new first bytes' True"], proc.stdout
    fetched, total = (
        int(n) for n in re.fullmatch(r"the 1% read fetched (\d+) of (\d+) pages", lines[2]).groups()
    )
    assert total == 5121 and total // 100 <= fetched < total // 25, proc.stdout  # 1% to 4%
