"""``graft shell``: the sqlite3 shell (apsw's ``Shell``) on a volume, plus ``.graft``.

Every dot-command and output mode of apsw's shell works as in the sqlite3 shell. Each
input (a statement or a dot-command) runs on a worker thread while the main thread
waits with a SIGINT handler that calls ``interrupt()``: SQLite runs a statement without
returning to Python, so Ctrl-C stops the statement at its next step, not the shell.
"""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime, timezone
from typing import Any, TextIO

import apsw
import apsw.shell

from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import GraftError

HISTORY_FILE = "~/.graft_history"
LOG_LIMIT = 10  # commits `.graft log` shows unless told


def commit_line(c: Any) -> str:
    """One commit as ``graft log`` prints it: LSN, time, pages and bytes."""
    stamp = datetime.fromtimestamp(c.time, timezone.utc).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    forked = f"  fork of {c.fork_of[0]} at LSN {c.fork_of[1]}" if c.fork_of else ""
    return (
        f"{c.lsn:>8}  {stamp}  {c.pages:>7} pages  {c.bytes:>10} bytes  "
        f"{c.page_count:>8} pages in all{forked}"
    )


class GraftShell(apsw.shell.Shell):
    """apsw's shell on a connection to a volume, with ``.graft status|pull|push|log``."""

    def __init__(
        self,
        con: apsw.Connection,
        volume: str,
        remote: str | None,
        token: str | None,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout, stderr=stderr, db=con)
        self.graft_con = con
        self.volume = volume
        self.remote = remote
        self.token = token
        self.history_file = HISTORY_FILE
        self.prompt = f"graft:{volume}> "
        self.moreprompt = " " * (len(self.prompt) - 5) + "...> "
        self.failed = False  # an input ended in an error (the exit status without a terminal)

    def handle_exception(self) -> None:
        self.failed = True
        super().handle_exception()

    def process_complete_line(self, command: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            super().process_complete_line(command)
            return
        failure: list[BaseException] = []

        def run() -> None:
            try:
                super(GraftShell, self).process_complete_line(command)
            except BaseException as exc:  # re-raised on the main thread, as the shell expects
                failure.append(exc)

        def on_sigint(signum: int, frame: Any) -> None:
            self.db.interrupt()  # the statement stops at its next step; the shell goes on

        worker = threading.Thread(target=run, name="graft-shell", daemon=True)
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            worker.start()
            worker.join()
        finally:
            signal.signal(signal.SIGINT, previous)
        if failure:
            raise failure[0]

    def command_graft(self, cmd: list[str]) -> None:
        """graft status|pull|push|log ?N?: Sync state, pull, push, or the last N commits

        status, pull and push run PRAGMA graft_status, graft_pull and graft_push on the
        volume and print their JSON. log prints the server's last N commits (default 10),
        newest first, as ``graft log`` does.
        """
        if not cmd or cmd[0] not in ("status", "pull", "push", "log"):
            raise self.Error("give .graft status, .graft pull, .graft push or .graft log ?N?")
        what, rest = cmd[0], cmd[1:]
        if what != "log":
            if rest:
                raise self.Error(f".graft {what} takes no arguments")
            row = self.graft_con.execute(f"PRAGMA graft_{what}").fetchone()
            assert row is not None
            self.write(self.stdout, json.dumps(json.loads(row[0]), sort_keys=True) + "\n")
            return
        if len(rest) > 1 or (rest and not rest[0].isdigit()) or (rest and int(rest[0]) < 1):
            raise self.Error("give .graft log ?N? with N a number of commits, 1 or more")
        if not self.remote:
            raise self.Error(".graft log reads the server's log: start graft shell with --remote")
        try:
            commits = Remote(self.remote, token=self.token).history(
                self.volume, None, int(rest[0]) if rest else LOG_LIMIT
            )
        except GraftError as exc:
            raise self.Error(str(exc)) from None
        for c in commits:
            self.write(self.stdout, commit_line(c) + "\n")


def run(shell: GraftShell, intro: str) -> int:
    """Run the shell until end of input or ``.exit``; the exit status.

    On a terminal, the loop reads lines with history and completion; otherwise it reads
    SQL and dot-commands to the end and exits 1 if any of them failed (like sqlite3).
    """
    try:
        shell.cmdloop(intro=intro)
    except SystemExit as exc:  # .exit ?CODE?
        code = exc.code
        return code if isinstance(code, int) else 0
    return 1 if shell.failed and not shell.interactive else 0
