"""Model-based test: random writes, pushes, pulls, resets, restarts and past reads by
several clients (each with its own cache) against a real server, checked after every
step against a simple model of the committed history."""

from __future__ import annotations

import uuid

import apsw
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import graft_vfs
from support.clients import pragma

CLIENTS = 3
OPTIONS = graft_vfs.Options(autopush=False)


class Client:
    """A real client (connection + cache dir) and what the model says it holds."""

    def __init__(self, vid: str, url: str, cache: str) -> None:
        self.vid, self.url, self.cache = vid, url, cache
        self.con = self.open()
        self.view: dict[int, str] = {}  # what its latest snapshot holds
        self.base = 0  # the remote LSN its view is based on
        self.pending = 0  # local commits not pushed
        self.diverged = False

    def open(self) -> apsw.Connection:
        return graft_vfs.connect(self.vid, remote=self.url, cache_dir=self.cache, options=OPTIONS)

    def close(self) -> None:
        name = self.con.open_vfs
        self.con.close()
        graft_vfs.unregister(name)


@pytest.mark.usefixtures("server")
class Replication(RuleBasedStateMachine):
    url = ""
    tmp = ""

    @initialize()
    def setup(self) -> None:
        self.vid = f"m-{uuid.uuid4().hex[:12]}"
        self.history: list[dict[int, str]] = [{}]  # remote LSN -> content
        self.clients = [
            Client(self.vid, self.url, f"{self.tmp}/{self.vid}-{i}") for i in range(CLIENTS)
        ]
        first = self.clients[0]
        first.con.execute("CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT)")
        assert pragma(first.con, "graft_push")["remote_lsn"] == 1
        self.history.append({})
        first.base = 1
        for c in self.clients[1:]:
            assert pragma(c.con, "graft_pull")["remote_lsn"] == 1
            c.base = 1

    def teardown(self) -> None:
        for c in getattr(self, "clients", []):
            c.close()

    @property
    def latest(self) -> int:
        return len(self.history) - 1

    @rule(i=st.integers(0, CLIENTS - 1), k=st.integers(0, 15), v=st.text(max_size=3000))
    def write(self, i: int, k: int, v: str) -> None:
        c = self.clients[i]
        c.con.execute("INSERT OR REPLACE INTO kv VALUES(?, ?)", (k, v))
        if c.view.get(k) != v:
            c.view[k] = v
            c.pending += 1

    @rule(i=st.integers(0, CLIENTS - 1), k=st.integers(0, 15))
    def delete(self, i: int, k: int) -> None:
        c = self.clients[i]
        c.con.execute("DELETE FROM kv WHERE k = ?", (k,))
        if k in c.view:
            del c.view[k]
            c.pending += 1

    @rule(i=st.integers(0, CLIENTS - 1))
    def push(self, i: int) -> None:
        c = self.clients[i]
        if c.pending and (c.diverged or c.base != self.latest):
            with pytest.raises(apsw.SQLError, match="diverged"):
                c.con.execute("PRAGMA graft_push")
            c.diverged = True
            event("push rejected: diverged")
            return
        result = pragma(c.con, "graft_push")
        if c.pending:
            assert result["pushed"] and result["remote_lsn"] == self.latest + 1
            self.history.append(dict(c.view))
            c.base, c.pending = self.latest, 0
        else:
            assert not result["pushed"]

    @rule(i=st.integers(0, CLIENTS - 1))
    def pull(self, i: int) -> None:
        c = self.clients[i]
        if c.pending and (c.diverged or c.base != self.latest):
            with pytest.raises(apsw.SQLError, match="diverged"):
                c.con.execute("PRAGMA graft_pull")
            c.diverged = True
            return
        result = pragma(c.con, "graft_pull")
        assert result["remote_lsn"] == self.latest
        if not c.pending:
            c.view, c.base = dict(self.history[-1]), self.latest

    @rule(i=st.integers(0, CLIENTS - 1))
    def reset(self, i: int) -> None:
        c = self.clients[i]
        result = pragma(c.con, "graft_reset")
        assert result["discarded_commits"] == c.pending
        c.view, c.base, c.pending, c.diverged = dict(self.history[-1]), self.latest, 0, False

    @rule(i=st.integers(0, CLIENTS - 1))
    def restart(self, i: int) -> None:
        c = self.clients[i]
        c.close()
        c.con = c.open()

    @precondition(lambda self: self.latest >= 1)
    @rule(i=st.integers(0, CLIENTS - 1), data=st.data())
    def read_past(self, i: int, data: st.DataObject) -> None:
        lsn = data.draw(st.integers(1, self.latest))
        c = self.clients[i]
        past = graft_vfs.connect(self.vid, remote=self.url, cache_dir=c.cache, lsn=lsn)
        try:
            assert dict(past.execute("SELECT k, v FROM kv").fetchall()) == self.history[lsn]
        finally:
            past.close()

    @invariant()
    def clients_see_the_model(self) -> None:
        for c in getattr(self, "clients", []):
            assert dict(c.con.execute("SELECT k, v FROM kv").fetchall()) == c.view
            status = pragma(c.con, "graft_status")
            assert bool(status["pending_push"]) == bool(c.pending)
            assert status["diverged"] == c.diverged


@pytest.fixture
def machine(server, tmp_path):
    Replication.url = server.url
    Replication.tmp = str(tmp_path)
    return Replication


def test_replication_model(machine):
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
