"""Model-based test: random writes, pushes, pulls, resets, restarts (some of them killing
a push half way), GC and past reads by several clients (each a cache directory with two
connections, which may hold a read transaction open across steps) against two real
server processes on one store, checked after every step against a model of the history:
what every connection reads, and every cache's exact local and remote LSNs.

A second machine runs with background push and pull on (``autopush``,
``pull_interval``) and waits after every step for the caches to settle.

``GRAFT_MODEL_EXAMPLES`` (default 10) sets how many examples each machine runs
(``make soak``: many more).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import apsw
import hypothesis.strategies as st
import pytest
from hypothesis import event
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import graft_vfs
from graft_server.gc import Retention, collect
from graft_server.volumes import Volumes
from graft_vfs.core.errors import SnapshotExpired
from support.clients import child_env, pragma
from support.models import run_machine, two_servers

CLIENTS = 3
CONNECTIONS = 2  # per cache directory
SETTLE_BOUND = 60.0  # seconds the background may take to settle: a bound, not a timing

PUSH_CHILD = textwrap.dedent(
    """
    import sys, apsw, graft_vfs
    vid, url, cache = sys.argv[1:4]
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache,
                            options=graft_vfs.Options(autopush=False))
    try:
        con.execute("PRAGMA graft_push").fetchall()
    except apsw.SQLError as exc:
        print("diverged" if "diverged" in str(exc) else exc, flush=True)
        sys.exit(3)
    print("pushed", flush=True)
    """
)

Kv = dict[int, str]


class Cache:
    """A client: one cache directory, its connections, and what the model says of it."""

    def __init__(self, machine: Replication, i: int) -> None:
        self.machine, self.i = machine, i
        self.cache = f"{machine.tmp}/{machine.vid}-{i}"
        self.server = i % len(machine.urls)  # which server it talks to
        self.cons = [self.open() for _ in range(CONNECTIONS)]
        self.held: dict[int, Kv] = {}  # connection -> the snapshot its open transaction reads
        self.view: Kv = {}  # what its latest local snapshot holds
        self.base = 0  # the remote LSN its view is based on
        self.local = 0  # its latest local LSN
        self.synced = 0  # the local LSN of its last sync
        self.diverged = False
        self.in_flight: int | None = None  # a killed push: 0 unsent, else the LSN it landed at
        self.intent: tuple[int, Kv] = (0, {})  # the killed push's local LSN and content

    @property
    def url(self) -> str:
        return self.machine.urls[self.server]

    @property
    def pending(self) -> int:
        return self.local - self.synced

    def open(self) -> apsw.Connection:
        con = graft_vfs.connect(
            self.machine.vid, remote=self.url, cache_dir=self.cache, options=self.machine.options
        )
        # SQLite's smallest page cache: a held transaction re-reads its pages from graft
        con.execute("PRAGMA cache_size=1")
        return con

    def close(self) -> None:
        names = {con.open_vfs for con in self.cons}
        for con in self.cons:
            con.close()
        for name in names:
            graft_vfs.unregister(name)
        self.held = {}

    def took(self, remote_lsn: int, content: Kv) -> None:
        """A sync left it at ``remote_lsn`` with nothing pending."""
        self.view, self.base, self.synced = dict(content), remote_lsn, self.local
        self.diverged, self.in_flight = False, None


def read(con: apsw.Connection) -> Kv:
    return dict(con.execute("SELECT k, v FROM kv").fetchall())


@pytest.mark.usefixtures("own_server")
class Replication(RuleBasedStateMachine):
    urls: list[str] = []
    store = None
    tmp = ""
    options = graft_vfs.Options(autopush=False)
    background = False

    @initialize()
    def setup(self) -> None:
        self.vid = f"m-{uuid.uuid4().hex[:12]}"
        self.history: list[Kv] = [{}]  # remote LSN -> content
        self.floor = 0  # GC keeps LSNs from here on readable
        self.clients = [Cache(self, i) for i in range(CLIENTS)]
        first = self.clients[0]
        first.cons[0].execute("CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT)")
        first.local += 1
        if not self.background:
            assert pragma(first.cons[0], "graft_push")["remote_lsn"] == 1
        self.history.append({})
        first.took(1, {})
        for c in self.clients[1:]:
            if not self.background:
                assert pragma(c.cons[0], "graft_pull")["remote_lsn"] == 1
            c.local += 1
            c.took(1, {})
        self.settle()

    def teardown(self) -> None:
        for c in getattr(self, "clients", []):
            c.close()
        # The volume leaves the store, so that the next example's GC passes stay small.
        for key in self.store.list(f"volumes/{getattr(self, 'vid', '-')}/"):
            self.store.delete(key)

    @property
    def latest(self) -> int:
        return len(self.history) - 1

    def settle(self) -> None:
        """With background sync: wait until every cache pushed and pulled all there is."""
        if not self.background:
            return
        deadline = time.monotonic() + SETTLE_BOUND
        for c in self.clients:
            while True:
                status = pragma(c.cons[0], "graft_status")
                if status["pending_push"] == 0 and status["remote_lsn"] == self.latest:
                    break
                assert time.monotonic() < deadline, f"cache {c.i} did not settle: {status}"
                time.sleep(0.02)
            c.local, c.synced = status["local_lsn"], status["local_lsn"]
            c.took(self.latest, self.history[-1])

    def committed(self, c: Cache) -> None:
        """``c`` made a local commit (in the background: pushed, then pulled by all)."""
        c.local += 1
        if self.background:
            deadline = time.monotonic() + SETTLE_BOUND
            while pragma(c.cons[0], "graft_status")["pending_push"]:
                assert time.monotonic() < deadline, "the background push did not happen"
                time.sleep(0.02)
            self.history.append(dict(c.view))
            self.settle()

    # -- writes, on a connection that holds no transaction --------------------------------

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, CONNECTIONS - 1), k=st.integers(0, 15),
          v=st.text(max_size=3000))
    def write(self, i: int, j: int, k: int, v: str) -> None:
        c = self.clients[i]
        if j in c.held or c.view.get(k) == v:
            return  # (an unchanged row makes no commit)
        c.cons[j].execute("INSERT OR REPLACE INTO kv VALUES(?, ?)", (k, v))
        c.view[k] = v
        self.committed(c)

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, CONNECTIONS - 1), k=st.integers(0, 15))
    def delete(self, i: int, j: int, k: int) -> None:
        c = self.clients[i]
        if j in c.held or k not in c.view:
            return
        c.cons[j].execute("DELETE FROM kv WHERE k = ?", (k,))
        del c.view[k]
        self.committed(c)

    # -- read transactions held across steps ----------------------------------------------

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, CONNECTIONS - 1))
    def begin_read(self, i: int, j: int) -> None:
        c = self.clients[i]
        if j in c.held:
            return
        c.cons[j].execute("BEGIN")
        assert read(c.cons[j]) == c.view
        c.held[j] = dict(c.view)

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, CONNECTIONS - 1))
    def end_read(self, i: int, j: int) -> None:
        c = self.clients[i]
        if j not in c.held:
            return
        if c.held[j] != c.view:
            event("a held transaction saw an older snapshot than its cache's")
        c.cons[j].execute("COMMIT")
        del c.held[j]

    # -- sync -------------------------------------------------------------------------------

    def lands(self, c: Cache) -> bool:
        return not c.diverged and c.base == self.latest

    @precondition(lambda self: not self.background)
    @rule(i=st.integers(0, CLIENTS - 1))
    def push(self, i: int) -> None:
        c = self.clients[i]
        if c.in_flight is not None:  # a push killed half way is sent again, alone
            if not self.finish_killed_push(c):
                with pytest.raises(apsw.SQLError, match="diverged"):
                    c.cons[0].execute("PRAGMA graft_push")
                return
            result = pragma(c.cons[0], "graft_push")
            assert (result["pushed"], result["remote_lsn"]) == (True, c.base)
            assert result["local_lsn"] == c.synced
            return
        if c.pending and not self.lands(c):
            with pytest.raises(apsw.SQLError, match="diverged"):
                c.cons[0].execute("PRAGMA graft_push")
            c.diverged, c.in_flight = True, None
            event("push rejected: diverged")
            return
        result = pragma(c.cons[0], "graft_push")
        assert result["pushed"] == bool(c.pending)
        if c.pending:
            assert result["remote_lsn"] == self.latest + 1
            self.history.append(dict(c.view))
            c.took(self.latest, c.view)

    @precondition(lambda self: not self.background)
    @rule(i=st.integers(0, CLIENTS - 1), n=st.integers(1, 4), v=st.text(max_size=50))
    def commit_and_push(self, i: int, n: int, v: str) -> None:
        """``n`` commits, each pushed at once: a history long enough for GC and the past."""
        c = self.clients[i]
        if not self.lands(c) or c.in_flight is not None or 0 in c.held:
            return
        for step in range(n):
            self.write(i, 0, step, f"{v}{self.latest}")
            self.push(i)

    @precondition(lambda self: not self.background)
    @rule(i=st.integers(0, CLIENTS - 1), point=st.sampled_from(["before_send", "after_ack"]))
    def push_killed(self, i: int, point: str) -> None:
        """Another process on this cache pushes and is killed at ``point``: a restart mid-push."""
        c = self.clients[i]
        if not c.pending or c.in_flight is not None or not self.lands(c):
            return
        child = subprocess.run(
            [sys.executable, "-c", PUSH_CHILD, self.vid, c.url, c.cache],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(f"client.push.{point}"),
        )
        assert child.returncode == -9, child.stdout + child.stderr
        c.intent = (c.local, dict(c.view))
        if point == "after_ack":
            self.history.append(dict(c.view))
            c.in_flight = self.latest
        else:
            c.in_flight = 0

    def finish_killed_push(self, c: Cache) -> bool:
        """The model of sending a killed push again: True if it lands (or had landed)."""
        target, content = c.intent
        if c.in_flight:
            event("push retried after a kill: recognised by its hash")
            base = c.in_flight
        elif self.lands(c):
            self.history.append(content)
            base = self.latest
        else:
            c.diverged, c.in_flight = True, None
            return False
        c.base, c.synced, c.in_flight = base, target, None
        return True

    @precondition(lambda self: not self.background)
    @rule(i=st.integers(0, CLIENTS - 1))
    def pull(self, i: int) -> None:
        c = self.clients[i]
        # A pull finishes a push in flight first.
        if c.in_flight is not None and not self.finish_killed_push(c):
            with pytest.raises(apsw.SQLError, match="diverged"):
                c.cons[0].execute("PRAGMA graft_pull")
            return
        if c.pending and not self.lands(c):
            with pytest.raises(apsw.SQLError, match="diverged"):
                c.cons[0].execute("PRAGMA graft_pull")
            c.diverged, c.in_flight = True, None
            return
        result = pragma(c.cons[0], "graft_pull")
        assert (result["remote_lsn"], result["pulled"]) == (self.latest, c.base != self.latest)
        if result["pulled"]:
            c.local += 1
            c.took(self.latest, self.history[-1])

    @precondition(lambda self: not self.background)
    @rule(i=st.integers(0, CLIENTS - 1))
    def reset(self, i: int) -> None:
        c = self.clients[i]
        if c.in_flight is not None:
            return  # (reset's handling of a push in flight is tests/test_crash.py's)
        result = pragma(c.cons[0], "graft_reset")
        assert result["discarded_commits"] == c.pending
        c.local += (c.pending > 0) + (c.base != self.latest)
        assert result["local_lsn"] == c.local
        c.took(self.latest, self.history[-1])

    @rule(i=st.integers(0, CLIENTS - 1), switch=st.booleans())
    def restart(self, i: int, switch: bool) -> None:
        """Close every connection of a cache and open them again (on the other server)."""
        c = self.clients[i]
        c.close()
        if switch:
            c.server = (c.server + 1) % len(self.urls)
        c.cons = [c.open() for _ in range(CONNECTIONS)]

    # -- GC and the past ----------------------------------------------------------------------

    @precondition(lambda self: not self.background)
    @rule(keep=st.integers(1, 4))
    def gc(self, keep: int) -> None:
        """``graft gc`` keeping the last ``keep`` LSNs (objects deleted at once: no grace),
        then a read from an empty cache on each side of the floor."""
        report = collect(Volumes(self.store), Retention(lsns=keep), grace=0)
        floor = report.floors.get(self.vid, 0)
        assert self.floor <= floor <= max(self.floor, self.latest - keep + 1)
        if floor > self.floor:
            event("gc raised the floor")
        self.floor = floor
        for lsn in {max(floor - 1, 1), max(floor, 1)} if self.latest else ():
            self.check_past(self.clients[0], lsn, fresh=True)

    @precondition(lambda self: self.latest >= 1)
    @rule(i=st.integers(0, CLIENTS - 1), fresh=st.booleans(), data=st.data())
    def read_past(self, i: int, fresh: bool, data: st.DataObject) -> None:
        self.check_past(self.clients[i], data.draw(st.integers(1, self.latest)), fresh)

    def check_past(self, c: Cache, lsn: int, fresh: bool) -> None:
        """Open LSN ``lsn`` through ``c``'s cache, or an empty one (every page from the server)."""
        cache = f"{self.tmp}/{self.vid}-past-{uuid.uuid4().hex[:8]}" if fresh else c.cache
        try:
            past = graft_vfs.connect(self.vid, remote=c.url, cache_dir=cache, lsn=lsn)
            name = past.open_vfs
            try:
                seen = read(past)
            finally:
                past.close()  # (the client's cache's VFS stays: its connections use it)
                if fresh:
                    graft_vfs.unregister(name)
        except apsw.IOError as exc:
            # Below the floor: expired (or read whole from what a cache kept), never
            # other data; from the floor on: readable.
            assert lsn < self.floor and isinstance(exc.__cause__, SnapshotExpired), (
                lsn, self.floor, exc)
            event("past read below the GC floor: expired")
            return
        assert seen == self.history[lsn]

    # -- after every step -------------------------------------------------------------------

    @invariant()
    def caches_match_the_model(self) -> None:
        for c in getattr(self, "clients", []):
            for j, con in enumerate(c.cons):
                assert read(con) == c.held.get(j, c.view), f"cache {c.i} connection {j}"
            status = pragma(c.cons[0], "graft_status")
            assert status["local_lsn"] == c.local, (c.i, status)
            assert status["remote_lsn"] == c.base, (c.i, status)
            assert status["pending_push"] == c.pending, (c.i, status)
            assert status["diverged"] == c.diverged, (c.i, status)
            assert status["push_in_flight"] == (c.in_flight is not None), (c.i, status)


class BackgroundReplication(Replication):
    options = graft_vfs.Options(autopush=True, pull_interval=0.02)
    background = True


@pytest.fixture
def servers(own_server):
    yield from two_servers(own_server)


def test_replication_model(servers, tmp_path):
    run_machine(Replication, servers, str(tmp_path))


def test_replication_model_with_background_sync(servers, tmp_path):
    run_machine(BackgroundReplication, servers, str(tmp_path))
