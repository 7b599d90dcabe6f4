"""A volume's history: `graft log`, and snapshots by time (`--at`), on every store kind."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import apsw
import pytest

import graft_server.commits
from graft_server.gc import Retention, collect
from graft_server.objstore import MemoryStore
from graft_server.volumes import Volumes
from graft_vfs.client.remote import Remote
from graft_vfs.client.when import parse_time
from graft_vfs.core.errors import SnapshotExpired, SnapshotNotFound
from support.clients import graft, pragma
from support.commits import commit, page


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def test_parse_time_reads_iso_and_times_ago():
    assert parse_time("2026-11-30T12:00:00Z") == 1796040000.0
    assert parse_time("2026-11-30T12:00:00") == 1796040000.0  # no zone: UTC
    assert parse_time("2026-11-30T13:00:00+01:00") == 1796040000.0
    assert parse_time("90s", now=1000.0) == 910.0
    assert parse_time("5m", now=1000.0) == 700.0
    assert parse_time("2h", now=10_000.0) == 2800.0
    assert parse_time("1.5d", now=200_000.0) == 200_000.0 - 129_600
    for bad in ("yesterday", "5 minutes", "-5m", "", "2026-13-01"):
        with pytest.raises(ValueError, match="ISO 8601"):
            parse_time(bad)


@pytest.fixture
def clock(monkeypatch):
    """The commit clock of in-process servers, set by the test (seconds)."""
    now = [1000.0]
    monkeypatch.setattr(graft_server.commits.time, "time", lambda: now[0])
    return now


def test_lsn_at_finds_the_latest_commit_at_or_before_a_time(clock):
    store = MemoryStore()
    vols = Volumes(store, checkpoint_every=4)  # older commits come from log records
    times = {}
    lsn = 0
    for i in range(11):
        clock[0] = 1000.0 + 10 * i
        lsn = commit(vols, "v", lsn, 1, {0: page(i)})
        times[lsn] = clock[0]
    cold = Volumes(store)  # loaded from the checkpoint at LSN 8: 1-8 read from records
    for lsn, t in times.items():
        assert cold.history.lsn_at("v", t).lsn == lsn
        assert cold.history.lsn_at("v", t + 9.99).lsn == lsn
    assert cold.history.lsn_at("v", 10**9).lsn == 11
    with pytest.raises(SnapshotNotFound, match="no commit at or before"):
        cold.history.lsn_at("v", 999.0)
    # A clock that goes backwards (another server's) never makes times go backwards.
    clock[0] = 500.0
    assert commit(vols, "v", 11, 1, {0: page(99)}) == 12
    assert vols.history.lsn_at("v", 1100.0).lsn == 12
    assert [c.time for c in Volumes(store).history.log("v", None, 3)] == [1100.0] * 2 + [1090.0]
    # Below the GC floor: expired, with the oldest time it can give.
    assert collect(Volumes(store), Retention(lsns=5), grace=0).floors["v"] == 8
    with pytest.raises(SnapshotExpired, match="starts at LSN 8"):
        Volumes(store).history.lsn_at("v", 1065.0)
    assert Volumes(store).history.lsn_at("v", 1070.0).lsn == 8


def test_log_pages_newest_first_and_stops_at_the_floor(clock):
    store = MemoryStore()
    vols = Volumes(store, checkpoint_every=4)
    lsn = commit(vols, "v", 0, 3, {0: page(1), 1: page(2), 2: page(3)})
    for i in range(2, 10):
        clock[0] += 1
        lsn = commit(vols, "v", lsn, 3, {i % 3: page(i)})
    cold = Volumes(store)
    log = cold.history.log("v", None, 100)
    assert [c.lsn for c in log] == list(range(9, 0, -1))
    assert [c.pages for c in log] == [1] * 8 + [3]
    assert log[-1].page_count == 3 and all(c.bytes > 0 for c in log)
    assert [c.lsn for c in cold.history.log("v", 6, 2)] == [5, 4]
    assert [c.lsn for c in cold.history.log("v", 2, 10)] == [1]
    # (the floor is the newest checkpoint at or below latest - 4 + 1 = 6: LSN 4)
    assert collect(Volumes(store), Retention(lsns=4), grace=0).floors["v"] == 4
    assert [c.lsn for c in Volumes(store).history.log("v", None, 100)] == [9, 8, 7, 6, 5, 4]


def test_graft_log_and_sql_and_export_at_a_time(server, vid, client, tmp_path):
    con = client(vid)
    con.execute("CREATE TABLE t(x)")
    pragma(con, "graft_push")
    stamps = []
    for x in (1, 2, 3):
        con.execute("INSERT INTO t VALUES(?)", (x,))
        assert pragma(con, "graft_push")["remote_lsn"] == x + 1
        stamps.append(time.time())
        time.sleep(0.05)  # commit times apart: the test picks times between them

    out = graft("log", vid, "--remote", server.url, "--json").stdout.splitlines()
    log = [json.loads(line) for line in out]
    assert [c["lsn"] for c in log] == [4, 3, 2, 1]
    assert all(c["pages"] >= 1 and c["bytes"] > 0 and c["page_count"] == 2 for c in log)
    assert log[0]["time"] == iso(log[0]["timestamp"])[:23] + "Z"
    assert [c.lsn for c in Remote(server.url).history(vid, before=3, limit=5)] == [2, 1]
    text = graft("log", vid, "--remote", server.url, "--limit", "2").stdout
    assert [line.split()[0] for line in text.splitlines()] == ["4", "3"]

    at = iso(stamps[1])  # after LSN 3 (x=2), before LSN 4
    rows = graft("sql", vid, "SELECT x FROM t", "--remote", server.url, "--json",
                 "--at", at, "--cache", str(tmp_path / "c-at")).stdout
    assert [json.loads(line)["x"] for line in rows.splitlines()] == [1, 2]
    out = tmp_path / "at.db"
    exported = graft("export", vid, str(out), "--remote", server.url, "--at", at).stdout
    assert json.loads(exported)["lsn"] == 3
    now = graft("sql", vid, "SELECT count(*) AS n FROM t", "--remote", server.url, "--json",
                "--at", "0s", "--cache", str(tmp_path / "c-now")).stdout
    assert json.loads(now)["n"] == 3

    old = graft("sql", vid, "SELECT 1", "--remote", server.url, "--at", "1d",
                "--cache", str(tmp_path / "c-old"), check=False)
    assert old.returncode == 1 and "no commit at or before" in old.stderr
    # The same through the URI and connect().
    past = client(vid, cache=str(tmp_path / "c-uri"), at=at)
    assert past.execute("SELECT x FROM t").fetchall() == [(1,), (2,)]
    with pytest.raises(apsw.ReadOnlyError):
        past.execute("INSERT INTO t VALUES(9)")
    with pytest.raises(apsw.SQLError, match="ISO 8601"):
        client(vid, cache=str(tmp_path / "c-bad"), at="soon")
    bad = graft("sql", vid, "SELECT 1", "--remote", server.url, "--at", "soon", check=False)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
    both = graft("export", vid, str(tmp_path / "x.db"), "--remote", server.url, "--at", "0s",
                 "--lsn", "2", check=False)
    assert both.returncode == 2 and "not both" in both.stderr
