"""The opening: a volume's snapshot answered with the pages every first query reads.

A client new to a volume asks for its snapshot with ``?open=N``; the answer carries page
1, the schema B-tree, the statistics tables whole, then every other B-tree's root and
interior levels, up to N pages. Checked against SQLite's own ``dbstat`` on a real server
(fs and S3), byte for byte against the file.
"""

from __future__ import annotations

import os

import apsw
import pytest
import urllib3

import graft_vfs
from graft_server.objstore import FsStore, MemoryStore
from graft_server.segments import upload_segment
from graft_server.volumes import Volumes
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.remote import Remote
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import InvalidRequest
from graft_vfs.core.segment import MAX_SEGMENT_PAGES, encode_segment, upper_first
from support.clients import pragma
from support.commits import commit, contents, random_page

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


def test_a_large_commit_keeps_upper_levels_together_for_a_cold_server(server, vid, tmp_path):
    """A commit of more than one segment puts page 1 and every interior B-tree page in
    its first segment: a server with nothing cached builds the opening from a few
    ranged reads of it, not one read per page."""
    path = str(tmp_path / "large.db")
    con = apsw.Connection(path)
    con.execute("PRAGMA page_size=4096")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, pad TEXT)")
    con.execute("CREATE INDEX t_k ON t(k)")
    with con:
        con.executemany(
            "INSERT INTO t VALUES(?, ?, ?)",
            ((i, f"{(i * 7919) % 12000:08d}" * 6, "p" * 900) for i in range(12000)),
        )
    con.close()
    import_database(Remote(server.url), path, vid)
    wanted, content = expected_opening(path)
    assert len(content) > 8 and os.path.getsize(path) // 4096 > MAX_SEGMENT_PAGES
    cold = Volumes(server._backing())  # a server process started now: nothing cached
    before = dict(cold.store.stats)
    head, frames = cold.reads.opening(vid, 256)
    assert sorted(f.page for f in frames) == wanted
    vol = cold.index.volume(vid)
    with vol.lock:
        homes = {vol.locate(p, head.lsn).sid for p in wanted}
    assert len(homes) == 1  # every page of the opening lives in one segment
    reads = cold.store.stats["range_gets"] - before["range_gets"]
    # The upper segment's pages (1 read: the page map says which they are), then one
    # probe per tree of the level below its interior ones (2, in one batch): was a read
    # per page, by level, then 5 (the segment's head was read first, the probes one
    # tree after another).
    assert reads <= 3 < len(wanted), reads


def test_a_cold_opening_reads_statistics_roots_and_probes_in_one_round(server, vid, analyzed_db):
    """After page 1's segment, what the opening reads tree by tree and level by level
    (the statistics trees' pages, each tree's probe below its interior levels) comes in
    one batch of store reads: was one round per tree and per statistics level."""
    import_database(Remote(server.url), analyzed_db, vid)
    cold = Volumes(server._backing())  # a server process started now: nothing cached
    cold.reads.head(vid)  # the page map, loaded
    rounds: list[list[int]] = []
    frames_of = cold.reads._frames

    def counted(view, lsn, pages, known=None):
        pages = list(pages)
        before = cold.store.stats["range_gets"]
        got = frames_of(view, lsn, pages, known)
        if cold.store.stats["range_gets"] > before:
            rounds.append(pages)
        return got

    cold.reads._frames = counted
    head, frames = cold.reads.opening(vid, 256)
    wanted, content = expected_opening(analyzed_db)
    assert sorted(f.page for f in frames) == wanted
    assert all(f.frame for f in frames)
    assert len(rounds) == 1 and len(rounds[0]) > 3, rounds


def test_commit_segments_may_hold_one_upper_segment_between_the_others(tmp_path):
    """The hash check merges a commit's segments in page order holding at most two at
    once: ascending ranges plus one segment whose pages fall between them land; three
    interleaved segments are refused with a one-line error, and nothing is committed."""
    vols = Volumes(FsStore(str(tmp_path / "store")))
    pages = {p: random_page(p) for p in range(30)}
    digest = commit_hash("v", 0, 30, pages.items())

    def upload(group: list[int]) -> str:
        return upload_segment(vols.store, encode_segment((p, pages[p]) for p in group)[0])

    upper = [0, 7, 14, 21]  # the layout of core.segment.upper_first
    rest = [p for p in range(30) if p not in upper]
    sids = [upload(upper), upload(rest[:13]), upload(rest[13:])]
    assert vols.commits.commit("v", 0, 30, digest, sids=sids) == 1
    assert contents(vols, "v") == [pages[p] for p in range(30)]
    woven = [upload(list(range(i, 30, 3))) for i in range(3)]  # three interleaved
    with pytest.raises(InvalidRequest, match="interleave") as info:
        vols.commits.commit("v", 1, 30, commit_hash("v", 1, 30, pages.items()), sids=woven)
    assert "\n" not in str(info.value) and vols.reads.head("v").lsn == 1


def test_upper_first_lays_page_1_and_interior_pages_apart_only_when_they_split():
    upper = {0, 5, 9}
    assert upper_first(range(10), upper, 10) == [list(range(10))]  # one segment: as is
    assert upper_first(range(10), upper, 4) == [[0, 5, 9], [1, 2, 3, 4], [6, 7, 8]]
    assert upper_first([], upper, 4) == []
    # More upper pages than a segment holds: the first segment's worth, then the rest.
    assert upper_first(range(10), {0, 2, 4, 6, 8}, 3) == [[0, 2, 4], [1, 3, 5], [6, 7, 8], [9]]


def reference_interior_below(reads, view, lsn, page_count, requested, budget):
    """``Reads._interior_below`` as it was before it parsed pages lazily: every page of a
    level parsed for its children before the probe said whether they are leaves."""
    from graft_vfs.core.btree import interior_children, is_interior
    from graft_vfs.core.segment import decompress_page

    seen, level, extra, probe = set(requested), [], [], None
    for page, frame in requested.items():
        if frame.frame:
            level += interior_children(decompress_page(frame.frame, page), page)
    while budget > 0:
        level = [p for p in dict.fromkeys(level) if p < page_count and p not in seen]
        if not level:
            break
        if probe is None or probe.page != level[0]:
            probe = reads._frames(view, lsn, level[:1])[level[0]]
        if not probe.frame:
            break
        content = decompress_page(probe.frame, probe.page)
        if not is_interior(content, probe.page):
            break
        batch = level[:budget]
        budget -= len(batch)
        seen.update(batch)
        ahead = [
            p
            for p in interior_children(content, probe.page)[:1]
            if budget > 0 and p < page_count and p not in seen
        ]
        frames = reads._frames(view, lsn, batch[1:] + ahead)
        frames[probe.page] = probe
        probe = frames[ahead[0]] if ahead else None
        level = []
        for page in batch:
            frame = frames[page]
            if frame.frame:
                extra.append(frame)
                level += interior_children(decompress_page(frame.frame, page), page)
    return extra


def test_interior_pages_below_are_those_a_full_parse_finds(analyzed_db):
    """Parsing a level's pages only once the probe says they have interior children
    sends the same pages, in the same order, for any budget and any requested pages."""
    with open(analyzed_db, "rb") as f:
        data = f.read()
    count = len(data) // 4096
    vols = Volumes(MemoryStore())
    commit(vols, "v", 0, count, {p: data[p * 4096 : (p + 1) * 4096] for p in range(count)})
    vol = vols.index.volume("v")
    wanted, _ = expected_opening(analyzed_db)
    roots = [p for p in wanted if p]
    cases = [[0], roots[:1], roots[1:3], roots, [1, 2, count - 1]]
    for pages in cases:
        requested = vols.reads._frames(vol, 1, pages)
        for budget in (0, 1, 2, 5, 40, 1000):
            ours = vols.reads._interior_below(vol, 1, count, dict(requested), budget)
            theirs = reference_interior_below(vols.reads, vol, 1, count, dict(requested), budget)
            assert ours == theirs, (pages, budget)
    assert len(vols.reads._interior_below(vol, 1, count, requested, 1000)) > 5
