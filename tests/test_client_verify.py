"""The client checks every frame a server sends: a bad answer never reaches SQLite.

The corruption tests elsewhere damage the store, so the server's own checks catch them
first. Here a real server sits behind a real HTTP proxy (tests/support/tamper.py) that
damages its read answers: a flipped byte in a frame, another page's valid frame and
crc, another page's whole row. Each must be CorruptData at the client, raised before
anything is written to the local cache, so SQLite never sees the bytes.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

import apsw
import pytest

import graft_vfs
from graft_vfs.client.local import STORE_FILE
from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import CorruptData
from support.tamper import Fetch, TamperingProxy

ROWS = 60  # rows of 1000 bytes: about 16 pages


def flip_byte(answer: dict[str, Any], path: str, fetch: Fetch) -> dict[str, Any]:
    row = answer["pages"][0]
    frame = bytearray(row[3])
    frame[len(frame) // 2] ^= 0x01
    row[3] = bytes(frame)
    return answer


def _donor(row: list[Any], fetch: Fetch) -> list[Any]:
    """Another page's row, exactly as the server sends it (valid frame, valid crc)."""
    donor = fetch([2 if row[0] != 2 else 3])[0]
    assert donor[3] and donor[0] != row[0]
    return donor


def other_frame(answer: dict[str, Any], path: str, fetch: Fetch) -> dict[str, Any]:
    row = answer["pages"][0]
    donor = _donor(row, fetch)
    row[1:] = donor[1:]  # version, crc and frame of the other page, under this page's number
    return answer


def other_page(answer: dict[str, Any], path: str, fetch: Fetch) -> dict[str, Any]:
    answer["pages"][0] = _donor(answer["pages"][0], fetch)  # the other page's whole row
    return answer


DAMAGES = {"flipped_byte": flip_byte, "other_frame": other_frame, "other_page": other_page}
MESSAGES = {
    "flipped_byte": "checksum mismatch for page",
    "other_frame": "checksum mismatch for page",
    "other_page": "where another page was asked for",
}


@pytest.fixture
def volume(server, vid, connect, tmp_path) -> str:
    con = connect(
        vid,
        remote=server.url,
        cache_dir=str(tmp_path / "writer"),
        options=graft_vfs.Options(autopush=False),
    )
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES(?, randomblob(1000))", ((k,) for k in range(ROWS)))
    json.loads(con.execute("PRAGMA graft_push").fetchone()[0])
    return vid


def page_rows(cache: str) -> int:
    """Pages with data in a client's local store (read with the sqlite3 module, not graft)."""
    db = sqlite3.connect(os.path.join(cache, STORE_FILE))
    try:
        return int(db.execute("SELECT count(*) FROM pages WHERE data IS NOT NULL").fetchone()[0])
    finally:
        db.close()


@pytest.mark.stores("fs")
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_remote_refuses_a_damaged_read_answer(server, volume, damage) -> None:
    remote = Remote(server.url)
    head = remote.snapshot(volume)
    good = remote.read_pages(volume, head.lsn, [1, 2, 3])
    with TamperingProxy(server.url, DAMAGES[damage]) as proxy:
        bad = Remote(proxy.url)
        with pytest.raises(CorruptData, match=MESSAGES[damage]):
            bad.read_pages(volume, head.lsn, [1, 2, 3])
        assert proxy.rewritten == 1
        proxy.rewrite = None  # the same proxy, honest again: the same pages as the server's
        assert bad.read_pages(volume, head.lsn, [1, 2, 3]) == good


def count_through(proxy: TamperingProxy, vid: str, cache: str) -> list[tuple[int, int]]:
    """The table's row count and bytes through a client of ``proxy``, closed afterwards
    (its local store then holds, on disk, whatever the client kept)."""
    graft_vfs.register(proxy.url, cache, name="verify")
    try:
        con = apsw.Connection(
            f"file:{vid}", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY, vfs="verify"
        )
        try:
            rows: list[tuple[int, int]] = con.execute(
                "SELECT count(*), sum(length(v)) FROM t"
            ).fetchall()
            return rows
        finally:
            con.close()
    finally:
        graft_vfs.unregister("verify")


@pytest.mark.stores("fs")
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_sql_never_sees_a_damaged_frame(server, volume, damage, tmp_path) -> None:
    cache = str(tmp_path / "reader")
    with TamperingProxy(server.url, DAMAGES[damage]) as proxy:
        # Opening reads page 0 already (the header): it fails there or at the query.
        with pytest.raises(apsw.CorruptError, match=MESSAGES[damage]):
            count_through(proxy, volume, cache)
        assert proxy.rewritten >= 1
        assert page_rows(cache) == 0  # nothing of the bad answer was kept
        proxy.rewrite = None  # the same proxy, honest again: the right rows
        assert count_through(proxy, volume, cache) == [(ROWS, ROWS * 1000)]
    assert page_rows(cache) > 0  # and what was read then is kept: the check above can see it


@pytest.mark.stores("fs")
def test_an_answer_over_the_limit_is_refused_before_it_is_read_whole(
    server, volume, monkeypatch
) -> None:
    """A server (or anything on the way) sending more than MAX_ANSWER bytes: refused,
    and the connection is not reused with bytes left in it."""
    remote = Remote(server.url)
    head = remote.snapshot(volume)
    good = remote.read_pages(volume, head.lsn, [1, 2, 3])
    monkeypatch.setattr("graft_vfs.client.remote.MAX_ANSWER", 2000)
    with pytest.raises(CorruptData, match="an answer of .* bytes .at most 2000"):
        remote.read_pages(volume, head.lsn, list(range(1, head.page_count)))
    monkeypatch.undo()
    assert remote.read_pages(volume, head.lsn, [1, 2, 3]) == good  # the next call is sound


def test_each_value_of_a_read_answer_is_checked_and_named():
    """Remote._frames_of, alone: every row of a read answer is [page, version, crc,
    frame] with exact integers in range, in the order asked; the first bad value is
    named and nothing of the answer is used."""
    import zstandard

    from graft_vfs.core.segment import frame_crc

    frame = zstandard.ZstdCompressor().compress(b"x" * 4096)
    good = [7, 3, frame_crc(7, frame), frame]
    remote = Remote("http://127.0.0.1:9")
    assert remote._frames_of({"pages": [good]}, "v", 5, [7], 0)[7] == (3, b"x" * 4096)
    cases = [
        ([True, 3, good[2], frame], "a page"),
        ([7, 6, good[2], frame], "a version"),
        ([7, -1, good[2], frame], "a version"),
        ([7, 3, 1 << 32, frame], "a crc"),
        ([7, 3, "1", frame], "a crc"),
        ([1 << 40, 3, good[2], frame], "a page"),
        ([8, 3, frame_crc(8, frame), frame], "where another page was asked for"),
        ([7, 3, good[2] ^ 1, frame], "checksum mismatch for page 7"),
        ([7, 3, good[2]], "not \\[page, version, crc, frame\\]"),
    ]
    for row, named in cases:
        with pytest.raises(CorruptData, match=named):
            remote._frames_of({"pages": [row]}, "v", 5, [7], 0)
    with pytest.raises(CorruptData, match="missing"):
        remote._frames_of({"pages": [good]}, "v", 5, [7, 9], 0)
    with pytest.raises(CorruptData, match="too long"):
        remote._frames_of({"pages": [good, good]}, "v", 5, [7], 0)
