"""Clients as tests drive them: PRAGMA answers, the ``graft`` command, and a client in
another process that runs SQL sent to it line by line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import apsw


def pragma(con: apsw.Connection, name: str) -> Any:
    """A graft PRAGMA's JSON answer, decoded."""
    return json.loads(con.execute(f"PRAGMA {name}").fetchone()[0])


def child_env(crash_at: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a client child process: no exit flush (a kill is a
    kill) and no crash point but ``crash_at``."""
    env = {**os.environ, "GRAFT_EXIT_FLUSH_SECONDS": "0"}
    env.pop("GRAFT_CRASH_AT", None)
    if crash_at:
        env["GRAFT_CRASH_AT"] = crash_at
    env.update(extra)
    return env


def graft(*args: str, token: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The ``graft`` command as a user runs it (no GRAFT_ variables but ``token``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    if token is not None:
        env["GRAFT_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "graft_vfs.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"graft {args} failed: {proc.stderr}")
    return proc


COMMIT_CHILD = textwrap.dedent(
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
    """A client that makes one local commit, then pushes it if ``action`` is "push",
    printing "committed" and "pushed" as it gets there; killed at ``crash_at`` if given."""
    return subprocess.Popen(
        [sys.executable, "-c", COMMIT_CHILD, vid, url, cache, action],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(crash_at),
    )


def wait_for(proc: subprocess.Popen, word: str) -> None:
    """Read the child's output until the line ``word``."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"child exited ({proc.wait()}) before printing {word!r}")


SQL_CHILD = textwrap.dedent(
    """
    import json, sys, graft_vfs
    vid, url, cache, busy_ms, autopush = sys.argv[1:6]
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache,
                            options=graft_vfs.Options(autopush=autopush == "1"))
    con.set_busy_timeout(int(busy_ms))
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            rows = con.execute(line).fetchall()
            print(json.dumps({"rows": rows}), flush=True)
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
    """
)


class SqlChild:
    """A client in another process on ``cache``: one SQL statement a line, answered in JSON
    (``{"rows": [...]}`` or ``{"error": name, "message": text}``)."""

    def __init__(
        self, vid: str, url: str, cache: str, *, busy_ms: int = 0, autopush: bool = False
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SQL_CHILD, vid, url, cache, str(busy_ms), str(int(autopush))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        assert ready == "ready\n", f"the client exited with {self.proc.wait()}"

    def run(self, sql: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(sql.replace("\n", " ") + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the client exited with {self.proc.wait()}"
        return json.loads(line)

    def rows(self, sql: str) -> list[tuple]:
        answer = self.run(sql)
        assert "rows" in answer, answer
        return [tuple(r) for r in answer["rows"]]

    def close(self) -> int:
        """End it as a user would (end of input); its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
