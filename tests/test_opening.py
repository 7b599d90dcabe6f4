"""The opening: a volume's snapshot answered with the pages every first query reads.

A client new to a volume asks for its snapshot with ``?open=N``; the answer carries page
1, the schema B-tree, the statistics tables whole, then every other B-tree's root and
interior levels, up to N pages. Checked against SQLite's own ``dbstat`` on a real server
(fs and S3), byte for byte against the file.
"""

from __future__ import annotations

import apsw
import pytest
import urllib3

import graft_vfs
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.remote import Remote
from support.clients import pragma

WHOLE = ("sqlite_schema", "sqlite_stat1", "sqlite_stat4")


@pytest.fixture(scope="module")
def analyzed_db(tmp_path_factory) -> str:
    """Two tables and two indexes deep enough to have interior levels, analyzed."""
    path = str(tmp_path_factory.mktemp("opening") / "analyzed.db")
    con = apsw.Connection(path)
    con.execute("PRAGMA page_size=4096")
    con.execute(
        "CREATE TABLE a(id INTEGER PRIMARY KEY, k TEXT NOT NULL, pad TEXT NOT NULL);"
        "CREATE INDEX a_k ON a(k);"
        "CREATE TABLE b(id INTEGER PRIMARY KEY, v INTEGER);"
        "CREATE INDEX b_v ON b(v);"
    )
    with con:
        con.executemany(
            "INSERT INTO a VALUES(?, ?, ?)",
            ((i, f"key-{(i * 7919) % 30000:06d}" * 4, "p" * 300) for i in range(30000)),
        )
        con.executemany("INSERT INTO b VALUES(?, ?)", ((i, i * 31 % 1000) for i in range(5000)))
    con.execute("ANALYZE")
    con.close()
    return path


def expected_opening(path: str) -> tuple[list[int], dict[int, bytes]]:
    """(0-based pages the opening must hold, the file's pages)."""
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    rows = con.execute("SELECT name, pageno, pagetype FROM dbstat").fetchall()
    roots = {r for (r,) in con.execute("SELECT rootpage FROM sqlite_schema WHERE rootpage > 0")}
    con.close()
    pages = {pageno - 1 for name, pageno, kind in rows if name in WHOLE}
    pages |= {pageno - 1 for name, pageno, kind in rows if kind == "internal"}
    pages |= {r - 1 for r in roots}
    with open(path, "rb") as f:
        data = f.read()
    return sorted(pages), {p: data[p * 4096 : (p + 1) * 4096] for p in pages}


def test_the_opening_holds_schema_statistics_and_upper_levels(server, vid, analyzed_db):
    import_database(Remote(server.url), analyzed_db, vid)
    wanted, content = expected_opening(analyzed_db)
    assert 10 < len(wanted) < 256  # interior levels of several trees, under the budget
    snap, pages = Remote(server.url).opening(vid, 256)
    assert sorted(pages) == wanted
    assert next(iter(pages)) == 0  # page 1 first
    assert all(data == content[p] for p, (_, data) in pages.items())
    # A smaller budget: the first pages of the same order (page 1 and the schema first).
    snap, few = Remote(server.url).opening(vid, 3)
    assert len(few) == 3 and list(few)[0] == 0 and set(few) <= set(wanted)
    # No budget: a plain snapshot.
    assert Remote(server.url).opening(vid, 0) == (snap, {})


def test_a_cold_client_reads_its_first_rows_after_one_round_trip(
    server, vid, analyzed_db, client, monkeypatch
):
    monkeypatch.setenv("GRAFT_DIRECT", "0")  # a request is a round trip
    import_database(Remote(server.url), analyzed_db, vid)
    native = apsw.Connection(analyzed_db, flags=apsw.SQLITE_OPEN_READONLY)
    sql = "SELECT count(*), sum(length(pad)) FROM a WHERE k >= 'key-010000' AND k < 'key-010003'"
    expected = native.execute(sql).fetchall()
    native.close()
    con = client(vid, options=graft_vfs.Options(background_fetch=False))
    assert pragma(con, "graft_stats")["requests"] == 1  # the opening, nothing else yet
    assert con.execute(sql).fetchall() == expected
    # The schema, the statistics and both trees' upper levels were there: the index
    # leaf, then the table leaves.
    assert pragma(con, "graft_stats")["requests"] == 3


@pytest.mark.stores("fs")
@pytest.mark.parametrize("value", ["x", "-1", "1025", "99999999999999"])
def test_a_bad_budget_is_one_line_400(server, vid, analyzed_db, value):
    import_database(Remote(server.url), analyzed_db, vid)
    resp = urllib3.request("GET", f"{server.url}/v1/volumes/{vid}?open={value}")
    assert resp.status == 400
    message = resp.json()["message"]
    assert "open must be an integer in [0, 1024]" in message and "\n" not in message
