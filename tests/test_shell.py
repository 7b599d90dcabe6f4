"""``graft shell`` under a pseudo-terminal (as a user types) and with SQL on stdin."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import apsw
import pytest

import graft_vfs
from support.clients import graft
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)

# Emits a row now and then and never ends: only an interrupt stops it.
ENDLESS = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
    "SELECT 'tick ' || x FROM c WHERE x % 200000 = 0;"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")
TIMEOUT = 60.0


def seed(server, vid: str, tmp_path) -> None:
    path = str(tmp_path / "seed.db")
    con = apsw.Connection(path)
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES ('seeded')")
    con.close()
    graft("import", path, vid, "--remote", server.url)


def env(tmp_path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    out.update(HOME=str(tmp_path), TERM="dumb", GRAFT_EXIT_FLUSH_SECONDS="0")
    return out


class Terminal:
    """``graft shell`` on a pseudo-terminal: what it printed, read as it comes."""

    def __init__(self, args: list[str], environ: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.execve(sys.executable, [sys.executable, "-m", "graft_vfs", *args], environ)
        self.seen = ""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str) -> re.Match[str]:
        """Read until ``pattern`` appears after what earlier calls consumed."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end() :]
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the shell ended before {pattern!r}: {self.seen!r}"
                self.seen += ANSI.sub("", chunk.decode(errors="replace").replace("\r", ""))

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:
                select.select([self.fd], [], [], 0.1)
                os.read(self.fd, 65536)
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError("the shell did not exit")


def test_shell_on_a_terminal(server, vid, tmp_path):
    """Dot-commands, output modes, .graft status/push/log, and Ctrl-C stopping a running
    statement while the shell goes on; the writes reach the server."""
    seed(server, vid, tmp_path)
    cache = str(tmp_path / "shell-cache")
    term = Terminal(["shell", vid, "--remote", server.url, "--cache", cache], env(tmp_path))
    prompt = re.escape(f"graft:{vid}> ")
    term.expect(f"graft shell on {vid}")
    term.expect(prompt)
    term.send(".tables\n")
    term.expect(r"\bt\b")
    term.expect(prompt)
    term.send(".mode csv\n.header on\nSELECT 40 + 2 AS answer, x FROM t;\n")
    term.expect(r"answer,x\n42,seeded\n")
    term.expect(prompt)

    term.send(".graft status\n")
    status = json.loads(term.expect(r"\{.*\}\n").group(0))
    assert status["volume"] == vid and status["remote_lsn"] == 1 and status["local_lsn"] == 1

    term.send(".mode list\n" + ENDLESS + "\n")
    term.expect(r"tick 200000\n")  # the statement is running
    term.send("\x03")
    term.expect(r"interrupted")
    term.expect(prompt)
    term.send("SELECT 'still here';\n")  # the shell survived Ctrl-C
    term.expect(r"still here\n")
    term.expect(prompt)

    term.send("INSERT INTO t VALUES ('typed');\n.graft push\n")
    pushed = json.loads(term.expect(r"\{.*\}\n").group(0))
    assert pushed["pushed"] is True and pushed["remote_lsn"] == 2
    term.send(".graft log 5\n")
    term.expect(r"\s+2  \d{4}-\d\d-\d\dT[\d:.]+Z .*\n")
    term.expect(r"\s+1  \d{4}-\d\d-\d\dT")
    term.send(".exit\n")
    assert term.wait() == 0

    fresh = graft_vfs.connect(vid, remote=server.url, cache_dir=str(tmp_path / "fresh"))
    try:
        assert fresh.execute("SELECT x FROM t ORDER BY rowid").fetchall() == [
            ("seeded",),
            ("typed",),
        ]
    finally:
        fresh.close()


def shell(server, vid, tmp_path, sql: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft_vfs", "shell", vid, "--remote", server.url, *extra],
        input=sql,
        capture_output=True,
        text=True,
        timeout=120,
        env=env(tmp_path),
    )


def test_shell_reads_stdin_or_a_file_without_a_terminal(server, vid, tmp_path):
    seed(server, vid, tmp_path)
    cache = ["--cache", str(tmp_path / "c")]
    script = "INSERT INTO t VALUES ('piped');\n.mode csv\nSELECT count(*) FROM t;\n.graft status\n"
    proc = shell(server, vid, tmp_path, script, *cache)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "2" and json.loads(lines[1])["local_lsn"] == 2
    assert "graft shell on" not in proc.stdout  # no banner without a terminal
    # Written without a terminal, pushed at exit: another cache reads it.
    other = ["--cache", str(tmp_path / "other")]
    assert shell(server, vid, tmp_path, "SELECT x FROM t ORDER BY rowid;", *other).stdout == (
        "seeded\npiped\n"
    )

    path = tmp_path / "script.sql"
    path.write_text("SELECT nosuch FROM t;\nSELECT 'after the error';\n")
    failed = shell(server, vid, tmp_path, "", *other, "--file", str(path))
    assert failed.returncode == 1  # like sqlite3: the error is reported, the rest runs
    assert "no such column: nosuch" in failed.stderr
    assert failed.stdout == "after the error\n"

    missing = shell(server, "no-such-volume", tmp_path, "SELECT 1;", *other)
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: no volume 'no-such-volume'")
    assert missing.stderr.count("\n") == 1
