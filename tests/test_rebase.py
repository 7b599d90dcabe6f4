"""Automatic rebase of a rejected push (``Options(rebase=True)``), through a real server
on each store kind: a push whose transactions read nothing the server changed since their
base lands on the new head; one that read a changed page, or whose page 1 cannot merge,
is reported diverged as without rebase."""

from __future__ import annotations

import struct

import apsw
import pytest

import graft_vfs
from graft_vfs.client import sync, vfs
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.pages import Page1Conflict, merge_page1
from support.clients import pragma

REBASE = graft_vfs.Options(autopush=False, rebase=True)
ROWS = 40
PAD = 1500  # bytes per row: two rows per leaf page, so rows 1 and 40 share no page


def setup(client, vid, options=REBASE):
    """Two clients of a volume whose table ``t`` spans ~20 leaf pages (``u`` is empty)."""
    a = client(vid, options=options)
    a.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, pad TEXT NOT NULL)")
    a.execute("CREATE TABLE u(id INTEGER PRIMARY KEY, pad TEXT NOT NULL)")
    with a:
        a.executemany(
            "INSERT INTO t VALUES (?, 0, ?)", ((i, "x" * PAD) for i in range(1, ROWS + 1))
        )
    assert pragma(a, "graft_push")["remote_lsn"] == 1
    b = client(vid, options=options)
    assert b.execute("SELECT count(*) FROM t WHERE id = 20").fetchone() == (1,)
    return a, b


def rows(con):
    return con.execute("SELECT id, n FROM t ORDER BY id").fetchall()


def test_writes_to_different_pages_both_land_as_if_serial(client, vid):
    a, b = setup(client, vid)
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    b.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    assert pragma(a, "graft_push")["remote_lsn"] == 2
    pushed = pragma(b, "graft_push")  # rejected (based on LSN 1), rebased onto 2, sent again
    assert pushed["pushed"] and pushed["remote_lsn"] == 3
    stats = pragma(b, "graft_stats")
    assert stats["pushes_rejected"] == 1 and stats["rebases"] == 1
    status = pragma(b, "graft_status")
    assert not status["diverged"] and status["pending_push"] == 0 and status["remote_lsn"] == 3
    # b sees a's row without a pull (its snapshot is the rebased one), and a fresh client
    # sees the serial execution of a's then b's transaction.
    serial = apsw.Connection(":memory:")
    serial.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, pad TEXT)")
    serial.executemany("INSERT INTO t VALUES (?, 0, '')", ((i,) for i in range(1, ROWS + 1)))
    serial.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    serial.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    expected = rows(serial)
    assert rows(b) == expected
    fresh = client(vid, options=REBASE)
    assert rows(fresh) == expected
    assert fresh.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert pragma(a, "graft_pull")["remote_lsn"] == 3 and rows(a) == expected


def test_a_read_of_a_page_changed_remotely_diverges(client, vid):
    a, b = setup(client, vid)
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    assert pragma(a, "graft_push")["remote_lsn"] == 2
    # b reads row 1 (changed on the server) and writes row 40 from it: not serializable.
    b.execute("UPDATE t SET n = (SELECT n FROM t WHERE id = 1) + 1 WHERE id = ?", (ROWS,))
    with pytest.raises(apsw.SQLError, match="diverged.*not rebased: page"):
        pragma(b, "graft_push")
    assert pragma(b, "graft_status")["diverged"]
    assert pragma(b, "graft_stats")["rebases"] == 0


def test_a_page_sqlite_served_from_its_cache_counts_as_read(client, vid):
    a, b = setup(client, vid)
    # Row 1 read in an earlier transaction: SQLite keeps its page cached (the change
    # counter holds) and the write transaction below reads it without asking the VFS.
    n = b.execute("SELECT n FROM t WHERE id = 1").fetchone()[0]
    b.execute("BEGIN")
    assert b.execute("SELECT n FROM t WHERE id = 1").fetchone()[0] == n
    b.execute("UPDATE t SET n = ? WHERE id = ?", (n + 1, ROWS))
    b.execute("COMMIT")
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    assert pragma(a, "graft_push")["remote_lsn"] == 2
    with pytest.raises(apsw.SQLError, match="not rebased: page"):
        pragma(b, "graft_push")


def test_rebase_is_off_by_default(client, vid):
    opts = graft_vfs.Options(autopush=False)
    a, b = setup(client, vid, options=opts)
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    b.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    pragma(a, "graft_push")
    with pytest.raises(apsw.SQLError, match="diverged") as raised:
        pragma(b, "graft_push")
    assert "not rebased" not in str(raised.value)
    assert pragma(b, "graft_stats")["pushes_rejected"] == 1


def test_a_read_set_over_the_bound_is_not_rebased(client, vid, monkeypatch):
    a, b = setup(client, vid)
    monkeypatch.setattr(vfs, "MAX_READ_SET", 2)  # b's transaction reads more pages
    b.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    pragma(a, "graft_push")
    with pytest.raises(apsw.SQLError, match="not rebased: a local commit has no read set"):
        pragma(b, "graft_push")


def test_a_reset_after_a_rebase_then_a_refusal_discards_the_local_commit(
    client, vid, monkeypatch
):
    a, b = setup(client, vid)
    b.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    pragma(a, "graft_push")
    c = client(vid, options=REBASE)  # at a's commit: its push below lands
    rebase_onto = sync.Sync.rebase_onto

    def then_another_push(self, remote):
        why = rebase_onto(self, remote)
        if self.vid == vid and not pragma(c, "graft_status")["pending_push"]:
            c.execute("UPDATE t SET n = n + 1 WHERE id = 10")  # lands before b's resend
            pragma(c, "graft_push")
        return why

    monkeypatch.setattr(sync.Sync, "rebase_onto", then_another_push)
    monkeypatch.setattr(sync, "MAX_REBASES", 1)
    with pytest.raises(apsw.SQLError, match="diverged") as raised:
        pragma(b, "graft_push")  # rebased once, rejected again: no rebase left
    assert "not rebased" not in str(raised.value), raised.value
    assert pragma(b, "graft_stats")["rebases"] == 1
    assert pragma(b, "graft_reset")["discarded_commits"] == 1
    assert rows(b)[-1] == (ROWS, 0) and rows(b)[0] == (1, 5) and rows(b)[9] == (10, 1)


def test_read_sets_survive_a_restart(client, vid, tmp_path):
    a, b = setup(client, vid)
    b.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    cache = str(tmp_path / "cache1")  # b's cache directory (the second client made)
    b.close()
    graft_vfs.unregister(b.open_vfs)
    a.execute("UPDATE t SET n = n + 5 WHERE id = 1")
    pragma(a, "graft_push")
    again = client(vid, cache=cache, options=REBASE)
    assert pragma(again, "graft_status")["pending_push"] == 1
    assert pragma(again, "graft_push")["remote_lsn"] == 3
    assert rows(again)[0] == (1, 5) and rows(again)[-1] == (ROWS, 7)


def test_both_growing_the_file_diverges(client, vid):
    a, b = setup(client, vid)
    a.execute("INSERT INTO t VALUES (1000, 1, ?)", ("a" * PAD * 3,))
    b.execute("INSERT INTO u VALUES (1, ?)", ("b" * PAD * 3,))  # another table
    pragma(a, "graft_push")
    with pytest.raises(apsw.SQLError, match="not rebased: both sides changed the page count"):
        pragma(b, "graft_push")


def test_a_schema_change_on_the_server_diverges(client, vid):
    a, b = setup(client, vid)
    a.execute("CREATE INDEX t_n ON t(n)")  # b's row below would be missing from it
    b.execute("UPDATE t SET n = n + 7 WHERE id = ?", (ROWS,))
    pragma(a, "graft_push")
    with pytest.raises(apsw.SQLError, match="not rebased: the schema changed remotely"):
        pragma(b, "graft_push")


# -- page 1, field by field --------------------------------------------------------


def page1(page_count=10, freelist=(0, 0), cookie=1, body=b"") -> bytes:
    head = bytearray(b"SQLite format 3\x00" + bytes(84))
    struct.pack_into(">HBB", head, 16, 4096, 1, 1)
    struct.pack_into(">IIIII", head, 28, page_count, *freelist, cookie, 4)
    return bytes(head) + body.ljust(PAGE_SIZE - 100, b"\0")


def test_page1_merges_one_sided_changes():
    base = page1()
    grown = page1(page_count=12)
    freed = page1(freelist=(5, 1))
    assert merge_page1(base, grown, freed) == page1(page_count=12, freelist=(5, 1))
    assert merge_page1(base, freed, grown) == page1(page_count=12, freelist=(5, 1))
    assert merge_page1(base, base, grown) == grown
    # A local schema change over a remote growth.
    schema = page1(cookie=2, body=b"CREATE TABLE")
    assert merge_page1(base, schema, grown) == page1(page_count=12, cookie=2, body=b"CREATE TABLE")


@pytest.mark.parametrize(
    "local, remote, why",
    [
        (page1(page_count=11), page1(page_count=11), "page count"),
        (page1(page_count=11), page1(page_count=12), "page count"),
        (page1(freelist=(5, 1)), page1(freelist=(5, 1)), "freelist"),
        (page1(), page1(cookie=2), "schema changed remotely"),
        (page1(body=b"x"), page1(body=b"y"), "schema"),
        (page1(), page1(page_count=8), "cut off"),
    ],
)
def test_page1_conflicts(local, remote, why):
    with pytest.raises(Page1Conflict, match=why):
        merge_page1(page1(), local, remote)
