"""Every PRAGMA answers the fields README.md documents for it, whatever happened."""

from __future__ import annotations

import json
import re

import apsw
import pytest

import graft_vfs
from graft_vfs.client.pragmas import PRAGMAS
from support.clients import pragma
from test_docs import readme

PULL_FIELDS = "graft_pull"


def documented_fields() -> dict[str, set[str]]:
    """PRAGMA name -> the fields of its answer, from the PRAGMAs table of README.md."""
    fields = {}
    for name, answer in re.findall(r"^\| `PRAGMA (graft_\w+)` \| (.*) \|$", readme(), re.M):
        fields[name] = set(re.findall(r"`(\w+)`", answer))
    fields["graft_sync"] = {"push", "pull"}
    fields["graft_reset"] |= fields[PULL_FIELDS]  # "discarded_commits and the pull's fields"
    return fields


def check(con: apsw.Connection, name: str, fields: dict[str, set[str]]) -> dict:
    answer = pragma(con, name)
    assert set(answer) == fields[name], name
    return answer


def test_every_pragma_answers_its_documented_fields(client, vid):
    fields = documented_fields()
    assert set(fields) == set(PRAGMAS)
    a = client(vid, options=graft_vfs.Options(autopush=False))
    b = client(vid, options=graft_vfs.Options(autopush=False))
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    assert check(a, "graft_push", fields)["pushed"] is True
    assert check(b, "graft_pull", fields)["pulled"] is True
    # Nothing to do: a push or pull that moves nothing answers every field too.
    assert check(a, "graft_push", fields)["pushed"] is False
    assert check(a, "graft_pull", fields)["pulled"] is False
    sync = check(a, "graft_sync", fields)
    assert set(sync["push"]) == fields["graft_push"] and set(sync["pull"]) == fields["graft_pull"]
    assert check(a, "graft_reset", fields)["discarded_commits"] == 0
    for name in ("graft_status", "graft_stats", "graft_snapshot", "graft_version"):
        check(a, name, fields)
    check(b, "graft_hydrate", fields)
    prefetched = json.loads(b.execute("PRAGMA graft_prefetch('t')").fetchone()[0])
    assert set(prefetched) == fields["graft_prefetch"]


def test_reset_without_a_server_answers_the_pull_fields(tmp_path, connect):
    fields = documented_fields()
    con = connect("local-only", cache_dir=str(tmp_path))
    con.execute("CREATE TABLE t(x)")
    assert check(con, "graft_reset", fields)["pulled"] is False


def test_an_unknown_graft_pragma_is_an_error(tmp_path, connect):
    con = connect("local-only", cache_dir=str(tmp_path))
    with pytest.raises(apsw.SQLError, match="unknown PRAGMA graft_statuss; the graft PRAGMAs"):
        con.execute("PRAGMA graft_statuss").fetchall()
    with pytest.raises(apsw.SQLError, match="unknown PRAGMA graft_nope"):
        con.execute("PRAGMA main.graft_nope = 1").fetchall()
    assert con.execute("PRAGMA no_such_sqlite_pragma").fetchall() == []  # SQLite's own rule
