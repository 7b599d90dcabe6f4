"""kill -9 of real client and server processes at named points in the commit path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import apsw
import pytest

import graft_vfs
from graft_vfs.client.remote import Remote

CHILD = textwrap.dedent(
    """
    import sys, time, graft_vfs
    vid, url, cache, action = sys.argv[1:5]
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache,
                            options=graft_vfs.Options(autopush=False))
    with con:  # one transaction, one local commit
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES('survives')")
    print("committed", flush=True)
    if action == "push":
        con.execute("PRAGMA graft_push").fetchall()
        print("pushed", flush=True)
    time.sleep(60)
    """
)


def run_child(vid: str, url: str, cache: str, action: str, crash_at: str | None = None):
    env = {**os.environ, "GRAFT_EXIT_FLUSH_SECONDS": "0"}
    env.pop("GRAFT_CRASH_AT", None)
    if crash_at:
        env["GRAFT_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, vid, url, cache, action],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(proc: subprocess.Popen, word: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"child exited ({proc.wait()}) before printing {word!r}")


def pragma(con, name):
    return json.loads(con.execute(f"PRAGMA {name}").fetchone()[0])


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
