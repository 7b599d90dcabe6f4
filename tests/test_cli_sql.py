"""``graft sql`` and the errors a new user meets first, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import apsw
import pytest

import graft_vfs
from graft_vfs.client.remote import Remote
from support.clients import graft
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)

# Never ends on its own: only an interrupt stops it.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def one_line_error(proc: subprocess.CompletedProcess, status: int = 1) -> str:
    """The error of a failed command, checked to be exactly one line and no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: "), proc.stderr
    return proc.stderr


def rows(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.splitlines()


def seed(server, vid: str, tmp_path, sql: str) -> None:
    """Create ``vid`` on the server (LSN 1) from a SQLite file made with ``sql``."""
    path = str(tmp_path / f"{vid}.db")
    con = apsw.Connection(path)
    con.execute(sql)
    con.close()
    graft("import", path, vid, "--remote", server.url)


def test_sql_pulls_before_answering_unless_no_pull(server, vid, tmp_path):
    writer = ["--remote", server.url, "--cache", str(tmp_path / "writer")]
    reader = ["--remote", server.url, "--cache", str(tmp_path / "reader")]
    seed(server, vid, tmp_path, "CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    assert rows(graft("sql", vid, "SELECT count(*) FROM t", *reader)) == ["1"]
    graft("sql", vid, "INSERT INTO t VALUES (2)", *writer)
    assert rows(graft("sql", vid, "SELECT count(*) FROM t", *reader)) == ["2"]  # pulled
    graft("sql", vid, "INSERT INTO t VALUES (3)", *writer)
    # --no-pull answers from the cache as it is: the reader has not seen the third row.
    assert rows(graft("sql", vid, "SELECT count(*) FROM t", *reader, "--no-pull")) == ["2"]
    assert rows(graft("sql", vid, "SELECT count(*) FROM t", *reader)) == ["3"]


def test_sql_readonly_and_past_lsn(server, vid, tmp_path):
    cache = ["--remote", server.url, "--cache", str(tmp_path / "c")]
    seed(server, vid, tmp_path, "CREATE TABLE t(x); INSERT INTO t VALUES ('first')")
    first = 1
    graft("sql", vid, "UPDATE t SET x = 'second'", *cache)
    assert rows(graft("sql", vid, "SELECT x FROM t", *cache, "--lsn", str(first))) == ["first"]
    assert rows(graft("sql", vid, "SELECT x FROM t", *cache, "--readonly")) == ["second"]
    refused = graft("sql", vid, "UPDATE t SET x = 'third'", *cache, "--readonly", check=False)
    assert "readonly" in one_line_error(refused).replace("read-only", "readonly")
    past = graft("sql", vid, "UPDATE t SET x = 'third'", *cache, "--lsn", str(first), check=False)
    one_line_error(past)
    assert Remote(server.url).snapshot(vid).lsn == first + 1  # neither wrote anything
    both = graft("sql", vid, "SELECT 1", *cache, "--create", "--readonly", check=False)
    assert "--create" in one_line_error(both, status=2)


def test_sql_on_an_unknown_volume_says_so_and_creates_nothing(server, vid, tmp_path):
    cache = str(tmp_path / "c")
    proc = graft("sql", vid, "SELECT 1", "--remote", server.url, "--cache", cache, check=False)
    error = one_line_error(proc)
    assert f"no volume {vid!r} on {server.url}; --create creates it" in error
    assert "SQLITE_" not in error
    status = graft("status", vid, "--cache", cache, check=False)
    assert f"no volume {vid!r} in the local cache" in one_line_error(status)
    pulled = graft("pull", vid, "--remote", server.url, "--cache", cache, check=False)
    error = one_line_error(pulled)
    assert f"no volume {vid!r} on {server.url}" in error and "SQLITE_" not in error
    made = graft(
        "sql", vid, "CREATE TABLE t(x)", "--remote", server.url, "--cache", cache, "--create"
    )
    assert made.returncode == 0 and Remote(server.url).snapshot(vid).lsn == 1


def test_an_empty_volume_name_is_an_invalid_name(tmp_path):
    proc = graft("sql", "", "CREATE TABLE t(x)", "--cache", str(tmp_path), check=False)
    assert "invalid volume name ''" in one_line_error(proc)
    with pytest.raises(apsw.CantOpenError, match="invalid volume name ''") as info:
        graft_vfs.connect("", cache_dir=str(tmp_path / "py"))
    assert isinstance(info.value.__cause__, graft_vfs.InvalidVolumeId)


def test_ctrl_c_interrupts_a_running_statement(server, vid, tmp_path):
    seed(server, vid, tmp_path, "CREATE TABLE t(x)")
    cache = ["--remote", server.url, "--cache", str(tmp_path / "c")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft_vfs.cli", "sql", vid, f"SELECT 'started'; {ENDLESS}", *cache],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert out == ""


def test_export_into_a_missing_folder_is_a_one_line_error(server, vid, tmp_path):
    seed(server, vid, tmp_path, "CREATE TABLE t(x)")
    target = tmp_path / "missing" / "out.db"
    proc = graft("export", vid, str(target), "--remote", server.url, check=False)
    assert f"folder {tmp_path / 'missing'} does not exist" in one_line_error(proc)
    assert not (tmp_path / "missing").exists()


def test_usage_errors_are_one_line_with_status_2(tmp_path):
    for args in (
        ("sql",),
        ("sql", "v", "SELECT 1", "--lsn", "-1"),
        ("export", "v", str(tmp_path / "x.db"), "--remote", "http://127.0.0.1:9", "--lsn", "x"),
        ("token", "create", "--name", "a"),
        ("nope",),
    ):
        error = one_line_error(graft(*args, check=False), status=2)
        assert "--help" in error


def test_sql_json_output(server, vid, tmp_path):
    cache = ["--remote", server.url, "--cache", str(tmp_path / "c")]
    seed(server, vid, tmp_path, "CREATE TABLE t(name)")
    statements = "INSERT INTO t VALUES ('café'); SELECT name FROM t; PRAGMA graft_status"
    proc = graft("sql", vid, statements, *cache, "--json")
    lines = rows(proc)
    assert lines[0] == '{"name": "café"}'  # non-ASCII kept as is
    status = json.loads(lines[1])
    assert list(status) == ["graft_status"] and status["graft_status"]["volume"] == vid
    plain = graft("sql", vid, "PRAGMA graft_snapshot", *cache)
    assert json.loads(plain.stdout)["volume"] == vid  # without --json, the JSON text
    typo = graft("sql", vid, "PRAGMA graft_staus", *cache, check=False)
    assert "unknown PRAGMA graft_staus" in one_line_error(typo)


def test_status_and_volumes_json_shapes(server, vid, tmp_path):
    cache = str(tmp_path / "c")
    seed(server, vid, tmp_path, "CREATE TABLE t(x)")
    graft("pull", vid, "--remote", server.url, "--cache", cache)
    local = json.loads(graft("status", vid, "--cache", cache).stdout)
    remote = json.loads(graft("status", vid, "--cache", cache, "--remote", server.url).stdout)
    assert set(local) == set(remote) and local["server_lsn"] is None
    assert remote["server_lsn"] == 1
    listed = json.loads(graft("volumes", "--remote", server.url).stdout)
    mine = [v for v in listed if v["volume"] == vid]
    assert mine == [{"volume": vid, "lsn": 1, "page_count": mine[0]["page_count"]}]


def test_an_unnamed_database_on_the_graft_vfs_is_refused(tmp_path):
    """SQLite opens an empty filename as a private temporary database: never on graft."""
    graft_vfs.register(cache_dir=str(tmp_path / "anon"), name="graft-anon")
    try:
        for uri in ("file:?vfs=graft-anon", ""):
            with pytest.raises(apsw.CantOpenError, match="invalid volume name ''"):
                con = apsw.Connection(
                    uri,
                    vfs="graft-anon",
                    flags=apsw.SQLITE_OPEN_URI
                    | apsw.SQLITE_OPEN_READWRITE
                    | apsw.SQLITE_OPEN_CREATE,
                )
                con.execute("CREATE TABLE t(x)")
    finally:
        graft_vfs.unregister("graft-anon")
