"""kill -9 of real client and server processes at named points in the commit path."""

from __future__ import annotations

import os
import signal
import time

import apsw
import pytest

import graft_vfs
from graft_vfs.client.remote import Remote
from support.clients import pragma, run_child, wait_for


def wait_pushed(con, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pragma(con, "graft_status")["pending_push"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"not pushed: {pragma(con, 'graft_status')}")


@pytest.mark.parametrize("crash_at", [None, "client.commit.after_local"])
def test_client_killed_after_local_commit_pushes_on_restart(
    client, server, vid, tmp_path, crash_at
):
    cache = str(tmp_path / "victim")
    child = run_child(vid, server.url, cache, "commit", crash_at)
    if crash_at is None:
        wait_for(child, "committed")
        os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert Remote(server.url).log_entry(vid, 1) is None  # never pushed
    con = client(vid, cache=cache)  # restart: the commit is there and is pushed
    assert con.execute("SELECT x FROM t").fetchall() == [("survives",)]
    wait_pushed(con)
    fresh = client(vid)
    assert fresh.execute("SELECT x FROM t").fetchall() == [("survives",)]


@pytest.mark.parametrize("crash_at", ["client.push.before_send", "client.push.after_ack"])
def test_client_killed_mid_push_never_applies_twice(client, server, vid, tmp_path, crash_at):
    cache = str(tmp_path / "victim")
    child = run_child(vid, server.url, cache, "push", crash_at)
    assert child.wait(timeout=30) == -signal.SIGKILL
    landed = Remote(server.url).log_entry(vid, 1) is not None
    assert landed == (crash_at == "client.push.after_ack")
    con = client(vid, cache=cache, options=graft_vfs.Options(autopush=False))
    status = pragma(con, "graft_status")
    assert status["push_in_flight"] and status["pending_push"] == 1
    result = pragma(con, "graft_push")
    assert result["remote_lsn"] == 1  # the retry is recognised by its hash
    assert Remote(server.url).snapshot(vid).lsn == 1
    assert pragma(con, "graft_status")["pending_push"] == 0
    fresh = client(vid)
    assert fresh.execute("SELECT x FROM t").fetchall() == [("survives",)]


@pytest.mark.parametrize("crash_at", ["server.commit.after_segment", "server.commit.after_log"])
def test_server_killed_mid_commit_leaves_no_partial_commit(client, vid, own_server, crash_at):
    own_server.start(GRAFT_CRASH_AT=crash_at)
    url = own_server.url
    con = client(vid, remote=url, options=graft_vfs.Options(autopush=False))
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES('acknowledged?')")
    with pytest.raises(apsw.IOError, match="unreachable|answered"):
        con.execute("PRAGMA graft_push")
    assert own_server.proc.wait(timeout=10) == -signal.SIGKILL
    own_server.start()  # same store, same port, no crash point
    remote = Remote(url)
    landed = remote.log_entry(vid, 1) is not None
    assert landed == (crash_at == "server.commit.after_log")
    assert remote.log_entry(vid, 2) is None
    result = pragma(con, "graft_push")  # the client's retry succeeds exactly once
    assert result["remote_lsn"] == 1
    assert remote.snapshot(vid).lsn == 1
    fresh = client(vid, remote=url)
    assert fresh.execute("SELECT x FROM t").fetchall() == [("acknowledged?",)]
    assert fresh.execute("PRAGMA integrity_check").fetchone() == ("ok",)
