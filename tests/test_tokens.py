"""The token file and its scopes from the client's side: concurrent edits of the file,
its errors and JSON, and what a push or a read does when the server refuses a write."""

from __future__ import annotations

import json
import multiprocessing

import apsw
import pytest

import graft_vfs
from graft_server.auth import create_token, describe_entries, load_entries, revoke_token
from graft_vfs.client.remote import Remote
from support.clients import graft, pragma, run_child

ROUNDS = 20
EDITORS = 4  # processes editing the file at the same moment in each round


def _edit(path: str, name: str, barrier, revoke: str | None) -> None:
    barrier.wait()
    if revoke is not None:
        revoke_token(path, revoke)
    else:
        create_token(path, name, ["orders*"], "read")


def test_concurrent_creates_and_revokes_lose_no_update(tmp_path) -> None:
    """Every round, some processes create tokens while others revoke: every edit lands."""
    path = str(tmp_path / "tokens.json")
    ctx = multiprocessing.get_context("fork")
    lost = []
    for r in range(ROUNDS):
        doomed = [f"old-{r}-{i}" for i in range(EDITORS // 2)]
        for name in doomed:
            create_token(path, name, ["x"], "read")
        barrier = ctx.Barrier(EDITORS)
        editors = [
            ctx.Process(target=_edit, args=(path, f"new-{r}-{i}", barrier, None))
            for i in range(EDITORS // 2)
        ] + [ctx.Process(target=_edit, args=(path, "", barrier, name)) for name in doomed]
        for p in editors:
            p.start()
        for p in editors:
            p.join(timeout=60)
            assert p.exitcode == 0
        names = {e["name"] for e in load_entries(path)}
        lost += [n for n in doomed if n in names]
        lost += [f"new-{r}-{i}" for i in range(EDITORS // 2) if f"new-{r}-{i}" not in names]
    assert lost == []


def test_token_create_into_a_missing_folder_is_a_one_line_error(tmp_path) -> None:
    path = str(tmp_path / "missing" / "tokens.json")
    proc = graft(
        "token", "create", "--name", "a", "--volumes", "x", "--access", "read", "--file", path,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"folder {tmp_path / 'missing'} does not exist" in proc.stderr
    assert not (tmp_path / "missing").exists()


def test_token_list_shows_volumes_as_a_list_and_keeps_non_ascii(tmp_path) -> None:
    path = str(tmp_path / "tokens.json")
    for name, globs in (("one", ["café*"]), ("two", ["a*", "b*"])):
        args = [a for g in globs for a in ("--volumes", g)]
        proc = graft(
            "token", "create", "--name", name, *args, "--access", "read", "--file", path,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    # A file written by hand (or by an older graft) may hold one glob as a string.
    with open(path) as f:
        data = json.load(f)
    data["tokens"].append({**data["tokens"][0], "name": "three", "volumes": "c*"})
    with open(path, "w") as f:
        json.dump(data, f)
    proc = graft("token", "list", "--file", path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert '"café*"' in proc.stdout
    listed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["name"], e["volumes"]) for e in listed] == [
        ("one", ["café*"]),
        ("two", ["a*", "b*"]),
        ("three", ["c*"]),
    ]
    assert describe_entries(path) == listed


# -- pushes and reads refused by a server's token scope (a real server with --tokens) --


def seed(secured, vid: str, tmp_path) -> None:
    """Create ``vid`` on the secured server: an empty SQLite database at LSN 1."""
    path = str(tmp_path / f"{vid}.db")
    apsw.Connection(path).execute("PRAGMA user_version = 1")
    graft("import", path, vid, "--remote", secured.url, token=secured.tokens["rw"])


def test_a_push_refused_403_clears_its_intent_and_says_why(secured, tmp_path) -> None:
    url, ro = secured.url, secured.tokens["ro"]
    seed(secured, "app-403", tmp_path)
    con = graft_vfs.connect(
        "app-403",
        remote=url,
        cache_dir=str(tmp_path / "c"),
        options=graft_vfs.Options(token=ro, autopush=False),
    )
    try:
        con.execute("CREATE TABLE t(x)")
        with pytest.raises(apsw.AuthError, match="token 'ro'.*may not write"):
            con.execute("PRAGMA graft_push").fetchall()
        status = pragma(con, "graft_status")
        assert status["push_in_flight"] is False  # it was refused, not lost in flight
        assert status["pending_push"] == 1
        assert "Forbidden" in status["last_error"] and "may not write" in status["last_error"]
    finally:
        name = con.open_vfs
        con.close()
        graft_vfs.unregister(name)


def test_an_earlier_intent_survives_a_403(secured, tmp_path, monkeypatch) -> None:
    """A push that may have landed is kept in flight: only its own hash can tell."""
    url, rw, ro = secured.url, secured.tokens["rw"], secured.tokens["ro"]
    cache = str(tmp_path / "c")
    monkeypatch.setenv("GRAFT_TOKEN", rw)  # the child's token
    # The child commits a row 'survives' and dies right after the server applied its push.
    child = run_child("app-intent", url, cache, "push", crash_at="client.push.after_ack")
    assert child.wait(timeout=60) == -9
    monkeypatch.delenv("GRAFT_TOKEN")
    assert Remote(url, token=rw).snapshot("app-intent").lsn == 1

    def open_with(token: str) -> apsw.Connection:
        return graft_vfs.connect(
            "app-intent",
            remote=url,
            cache_dir=cache,
            options=graft_vfs.Options(token=token, autopush=False),
        )

    con = open_with(ro)
    try:
        con.execute("INSERT INTO t VALUES ('later')")  # a second local commit on top
        with pytest.raises(apsw.AuthError):
            con.execute("PRAGMA graft_push").fetchall()
        status = pragma(con, "graft_status")
        assert status["push_in_flight"] is True and "Forbidden" in status["last_error"]
    finally:
        name = con.open_vfs
        con.close()
        graft_vfs.unregister(name)
    con = open_with(rw)
    try:
        retried = pragma(con, "graft_push")  # recognised by its hash, not applied again
        assert (retried["pushed"], retried["remote_lsn"], retried["local_lsn"]) == (True, 1, 1)
        assert pragma(con, "graft_push")["remote_lsn"] == 2  # then the later commit
        status = pragma(con, "graft_status")
        assert status["diverged"] is False and status["pending_push"] == 0
        assert status["last_error"] is None and status["remote_lsn"] == 2
    finally:
        name = con.open_vfs
        con.close()
        graft_vfs.unregister(name)
    reader = ["--remote", url, "--cache", str(tmp_path / "fresh")]
    fresh = graft("sql", "app-intent", "SELECT x FROM t ORDER BY rowid", *reader, token=ro)
    assert fresh.stdout.splitlines() == ["survives", "later"]


def test_a_select_succeeds_with_commits_that_cannot_be_pushed(secured, tmp_path) -> None:
    url, ro = secured.url, secured.tokens["ro"]
    seed(secured, "app-select", tmp_path)
    cache = str(tmp_path / "c")
    con = graft_vfs.connect(
        "app-select",
        remote=url,
        cache_dir=cache,
        options=graft_vfs.Options(token=ro, autopush=False),
    )
    con.execute("CREATE TABLE t(x)")  # committed locally; this token can never push it
    name = con.open_vfs
    con.close()
    graft_vfs.unregister(name)
    args = ["--remote", url, "--cache", cache]
    read = graft("sql", "app-select", "SELECT count(*) FROM t", *args, token=ro, check=False)
    assert (read.returncode, read.stdout, read.stderr) == (0, "0\n", "")
    write = graft(
        "sql", "app-select", "INSERT INTO t VALUES (1)", *args, token=ro, check=False
    )
    assert write.returncode == 1 and write.stderr.count("\n") == 1
    assert "committed in the local cache but was not pushed" in write.stderr
