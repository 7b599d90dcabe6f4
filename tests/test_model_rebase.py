"""Model-based test of automatic rebase (``Options(rebase=True)``): several clients run
read-modify-write transactions on a table whose rows each sit on their own leaf page,
push, pull, reset and restart, against two real server processes on one store.

Rebase must be invisible to correctness: the server's state at every LSN is the serial
application, in landing order, of exactly the transactions that landed (fast-forward or
rebased), so a lost update, or a rebase that should have been refused, fails the check.
And rebase must engage when it may: the model predicts each rejected push's outcome from
what its transactions read and wrote (a key is a page here) against what the
transactions that landed since its base wrote, and the push must be rebased, or refused,
exactly as predicted.

What a local commit "read" is the client's documented contract: every page its connection
read since SQLite's page cache was last invalidated, which happens when the local LSN
moved (another connection's commit, a pull, a reset, a rebase) since that connection's
last transaction, not at its own commits. So each client's connections are modelled:
the writers' read sets, and a separate reader connection that the checks read through
(a full scan would put every page in a writer's read set).

Besides single steps, two rules play the cases rebase is about: ``race`` (two clients
write, then push one after the other) and ``cached_read`` (a writer's commit that read a
key in an earlier, landed transaction, whose page SQLite serves from its cache, is not
rebased over a change of that key).

The push contract checked exactly: a push sends its pending local commits as one remote
commit, so a push that lands on head ``h`` answers remote LSN ``h + 1`` whatever the
number ``n`` of local commits; a fast-forward answers ``local_commits == n`` at the same
local LSN, a rebased one ``local_commits == 1`` two local LSNs on (the server's head,
then the pending commits squashed on top of it).

``GRAFT_MODEL_EXAMPLES`` (default 10) sets how many examples run per store kind.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter

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
from support.clients import pragma
from support.models import run_machine, two_servers
from support.servers import ServerProcess

CLIENTS = 3
WRITERS = 2  # write connections per cache directory (and one reader)
ROWS = 9  # rows at the start, keys 1..ROWS
MAX_ROWS = 12  # inserts grow the table up to this many rows
HOME = ROWS // CLIENTS  # client i's key k is the (k + HOME * i)-th: small draws are disjoint
PAD = 2500  # bytes per row: one row per 4 KiB leaf page
REBASE = graft_vfs.Options(autopush=False, rebase=True)

Row = tuple[int, int]  # (n, w): a counter, and how many transactions wrote the row
State = dict[int, Row]  # id -> row
# ("rmw", k) | ("transfer", src, dst, amount) | ("copy", src, dst) | ("insert", id)
Op = tuple


def apply(state: State, op: Op) -> State:
    """``state`` after ``op``, run alone: the serial semantics of each transaction."""
    out = dict(state)
    kind = op[0]
    if kind == "rmw":
        n, w = out[op[1]]
        out[op[1]] = (n + 1, w + 1)
    elif kind == "transfer":
        _, src, dst, amount = op
        out[src] = (out[src][0] - amount, out[src][1] + 1)
        out[dst] = (out[dst][0] + amount, out[dst][1] + 1)
    elif kind == "copy":
        _, src, dst = op
        out[dst] = (out[src][0] + 1, out[dst][1] + 1)
    else:
        assert op[1] not in out, f"insert of an existing key {op[1]}: the model is wrong"
        out[op[1]] = (0, 0)
    return out


def replay(state: State, ops: list[Op]) -> State:
    for op in ops:
        state = apply(state, op)
    return state


@dataclasses.dataclass(frozen=True)
class Tx:
    """A local transaction: what it did, and which keys (pages) it read, wrote, grew."""

    op: Op
    own: frozenset[int]  # the keys it read itself
    reads: frozenset[int]  # its connection's read set at its commit, in keys
    writes: frozenset[int]
    grows: bool  # it added a page (an insert), changing the root page and page 1


@dataclasses.dataclass
class Writer:
    """A write connection and the model of its read set (keys read since SQLite's page
    cache was last invalidated, ``cache_lsn`` the local LSN that cache holds)."""

    con: apsw.Connection
    cache_lsn: int | None = None
    seen: set[int] = dataclasses.field(default_factory=set)


class Client:
    """One cache directory: its writers, its reader, and what the model says of it."""

    def __init__(self, machine: RebaseModel, i: int) -> None:
        self.machine, self.i = machine, i
        self.cache = f"{machine.tmp}/{machine.vid}-{i}"
        self.server = i % len(machine.urls)
        self.base = 0  # remote LSN its snapshot is based on
        self.local = 0  # its latest local LSN
        self.pending: list[Tx] = []
        self.diverged = False
        self.open()

    @property
    def url(self) -> str:
        return self.machine.urls[self.server]

    @property
    def view(self) -> State:
        """Remote state at its base plus its own unpushed transactions."""
        return replay(self.machine.history[self.base], [tx.op for tx in self.pending])

    def connect(self) -> apsw.Connection:
        return graft_vfs.connect(
            self.machine.vid, remote=self.url, cache_dir=self.cache, options=REBASE
        )

    def open(self) -> None:
        self.writers = [Writer(self.connect()) for _ in range(WRITERS)]
        self.reader = self.connect()

    def close(self) -> None:
        cons = [w.con for w in self.writers] + [self.reader]
        names = {con.open_vfs for con in cons}
        for con in cons:
            con.close()
        for name in names:
            graft_vfs.unregister(name)


def rows(con: apsw.Connection) -> State:
    return {k: (n, w) for k, n, w in con.execute("SELECT id, n, w FROM t ORDER BY id")}


def row(con: apsw.Connection, k: int) -> Row:
    got = con.execute("SELECT n, w FROM t WHERE id = ?", (k,)).fetchone()
    assert got is not None, f"row {k} is missing"
    return got[0], got[1]


# Outcomes counted across a test's examples (and reported to hypothesis with event()).
SEEN: Counter[str] = Counter()


def count(what: str) -> None:
    SEEN[what] += 1
    event(what)


class RebaseModel(RuleBasedStateMachine):
    urls: list[str] = []
    store = None
    tmp = ""

    @initialize()
    def setup(self) -> None:
        self.vid = f"r-{uuid.uuid4().hex[:12]}"
        # remote LSN -> the server's state, and the transactions that landed at it
        self.history: list[State] = [{}]
        self.landed: list[list[Tx]] = [[]]
        self.clients = [Client(self, i) for i in range(CLIENTS)]
        # Made through the first client's reader: the writers start with empty read sets.
        first = self.clients[0].reader
        first.execute(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, "
            "w INTEGER NOT NULL, pad TEXT NOT NULL)"
        )
        with first:
            first.executemany(
                "INSERT INTO t VALUES (?, 0, 0, ?)", ((k, "x" * PAD) for k in range(1, ROWS + 1))
            )
        # Page 1 (the schema), the table's root, then one leaf per row: keys are pages.
        assert first.execute("PRAGMA page_count").fetchone() == (ROWS + 2,)
        assert pragma(first, "graft_push")["remote_lsn"] == 1
        self.history.append({k: (0, 0) for k in range(1, ROWS + 1)})
        self.landed.append([])
        self.clients[0].base, self.clients[0].local = 1, 2
        for c in self.clients[1:]:
            assert pragma(c.reader, "graft_pull")["remote_lsn"] == 1
            c.base, c.local = 1, 1

    def teardown(self) -> None:
        for c in getattr(self, "clients", []):
            c.close()
        for key in self.store.list(f"volumes/{getattr(self, 'vid', '-')}/"):
            self.store.delete(key)

    @property
    def latest(self) -> int:
        return len(self.history) - 1

    # -- local transactions ---------------------------------------------------------------

    def transact(self, c: Client, j: int, op: Op, reads: set[int], writes: set[int]) -> None:
        """Run ``op`` as one transaction on writer ``j``, reading (and checking against the
        model) the rows it reads before writing from what it read."""
        wr = c.writers[j]
        if wr.cache_lsn != c.local:  # SQLite drops its cache: so does the read set
            wr.seen = set()
        view = c.view
        con = wr.con
        with con:
            if op[0] == "insert":
                assert con.execute("SELECT max(id) FROM t").fetchone()[0] == max(view)
            got = {k: row(con, k) for k in sorted(reads)}
            assert got == {k: view[k] for k in reads}, (c.i, j, op)
            if op[0] == "rmw":
                n, w = got[op[1]]
                con.execute("UPDATE t SET n = ?, w = ? WHERE id = ?", (n + 1, w + 1, op[1]))
            elif op[0] == "transfer":
                _, src, dst, amount = op
                for k, delta in ((src, -amount), (dst, amount)):
                    n, w = got[k]
                    con.execute("UPDATE t SET n = ?, w = ? WHERE id = ?", (n + delta, w + 1, k))
            elif op[0] == "copy":
                _, src, dst = op
                con.execute(
                    "UPDATE t SET n = ?, w = ? WHERE id = ?",
                    (got[src][0] + 1, got[dst][1] + 1, dst),
                )
            else:
                con.execute("INSERT INTO t VALUES (?, 0, 0, ?)", (op[1], "y" * PAD))
        c.local += 1
        wr.seen |= reads
        wr.cache_lsn = c.local
        c.pending.append(
            Tx(op, frozenset(reads), frozenset(wr.seen), frozenset(writes), op[0] == "insert")
        )

    @staticmethod
    def key(c: Client, k: int) -> int:
        """The ``k``-th key from client ``c``'s home: clients mostly touch their own keys
        (pushes that can rebase), and those of others when ``k`` is large (that cannot)."""
        keys = sorted(c.view)
        return keys[(k + HOME * c.i) % len(keys)]

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, WRITERS - 1), k=st.integers(0, 20))
    def increment(self, i: int, j: int, k: int) -> None:
        c = self.clients[i]
        key = self.key(c, k)
        self.transact(c, j, ("rmw", key), {key}, {key})

    @rule(
        i=st.integers(0, CLIENTS - 1),
        j=st.integers(0, WRITERS - 1),
        a=st.integers(0, 20),
        b=st.integers(1, 20),
        amount=st.integers(1, 5),
    )
    def transfer(self, i: int, j: int, a: int, b: int, amount: int) -> None:
        c = self.clients[i]
        src, dst = self.key(c, a), self.key(c, a + b)
        if src == dst:
            return
        self.transact(c, j, ("transfer", src, dst, amount), {src, dst}, {src, dst})

    @rule(
        i=st.integers(0, CLIENTS - 1),
        j=st.integers(0, WRITERS - 1),
        a=st.integers(0, 20),
        b=st.integers(1, 20),
    )
    def copy(self, i: int, j: int, a: int, b: int) -> None:
        """Read one key, write another from it: a conflict only through what it read."""
        c = self.clients[i]
        src, dst = self.key(c, a), self.key(c, a + b)
        if src == dst:
            return
        self.transact(c, j, ("copy", src, dst), {src, dst}, {dst})

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, WRITERS - 1), go=st.integers(0, 2))
    def insert(self, i: int, j: int, go: int) -> None:
        """A row past the last one: a new leaf page, a new cell in the root, a new page count.
        It reads the last leaf (the last row's page). One draw in three: a growth of the
        table's root makes every other client's pending push diverge."""
        c = self.clients[i]
        view = c.view
        if go or len(view) >= MAX_ROWS:
            return
        last = max(view)
        self.transact(c, j, ("insert", last + 1), {last}, {last + 1})

    @rule(i=st.integers(0, CLIENTS - 1), j=st.integers(0, WRITERS - 1), k=st.integers(0, 20))
    def peek(self, i: int, j: int, k: int) -> None:
        """A writer reads a row in a read transaction of its own: SQLite keeps the page in
        its cache, so the writer's next commits count it as read until the cache drops."""
        c = self.clients[i]
        wr = c.writers[j]
        if wr.cache_lsn != c.local:
            wr.seen = set()
        key = self.key(c, k)
        assert row(wr.con, key) == c.view[key], (c.i, j, key)
        wr.seen.add(key)
        wr.cache_lsn = c.local

    # -- sync -----------------------------------------------------------------------------

    def landed_since(self, base: int) -> list[Tx]:
        return [tx for lsn in range(base + 1, self.latest + 1) for tx in self.landed[lsn]]

    def land(self, c: Client, ops: list[Op]) -> None:
        state = replay(self.history[-1], ops)
        self.history.append(state)
        self.landed.append(list(c.pending))
        c.base, c.pending, c.diverged = self.latest, [], False

    @rule(i=st.integers(0, CLIENTS - 1))
    def push(self, i: int) -> None:
        c = self.clients[i]
        if not c.pending:
            result = pragma(c.reader, "graft_push")
            assert (result["pushed"], result["remote_lsn"]) == (False, c.base)
            return
        if c.diverged:
            with pytest.raises(apsw.SQLError, match="diverged") as raised:
                pragma(c.reader, "graft_push")
            assert "not rebased" not in str(raised.value)
            return
        before = pragma(c.reader, "graft_stats")
        head, n = self.latest, len(c.pending)
        ops = [tx.op for tx in c.pending]
        if c.base == head:
            result = pragma(c.reader, "graft_push")
            assert result["pushed"] and result["remote_lsn"] == head + 1, result
            assert (result["local_lsn"], result["local_commits"]) == (c.local, n), result
            count("push: fast-forward")
            self.land(c, ops)
            return
        # Rejected (another push landed since its base): rebased exactly when serializable.
        others = self.landed_since(c.base)
        written = frozenset().union(*(tx.writes for tx in others))
        touched = frozenset().union(*(tx.reads | tx.writes for tx in c.pending))
        remote_grew = any(tx.grows for tx in others)
        local_grew = any(tx.grows for tx in c.pending)
        if remote_grew or written & touched:
            why = "page count" if remote_grew and local_grew else r"page \d+, which"
            with pytest.raises(apsw.SQLError, match=f"diverged.*not rebased: .*{why}"):
                pragma(c.reader, "graft_push")
            after = pragma(c.reader, "graft_stats")
            assert after["pushes_rejected"] == before["pushes_rejected"] + 1
            assert after["rebases"] == before["rebases"]
            c.diverged = True
            own = frozenset().union(*(tx.own | tx.writes for tx in c.pending))
            if remote_grew:
                count("push: diverged, the server grew the table")
            elif written & own:
                count("push: diverged, a key it read changed remotely")
            else:
                count("push: diverged, a key its connection read earlier changed remotely")
            return
        result = pragma(c.reader, "graft_push")  # not diverged: the model says serializable
        assert result["pushed"] and result["remote_lsn"] == head + 1, result
        assert (result["local_lsn"], result["local_commits"]) == (c.local + 2, 1), result
        after = pragma(c.reader, "graft_stats")
        assert after["pushes_rejected"] == before["pushes_rejected"] + 1
        assert after["rebases"] == before["rebases"] + 1
        c.local += 2  # the server's head, then the pending commits squashed onto it
        count("push: rebased" + (", growing the table" if local_grew else ""))
        self.land(c, ops)

    @rule(
        i=st.integers(0, CLIENTS - 1),
        k=st.integers(1, CLIENTS - 1),
        j=st.integers(0, WRITERS - 1),
        a=st.integers(0, 20),
        b=st.integers(0, 20),
    )
    def race(self, i: int, k: int, j: int, a: int, b: int) -> None:
        """Two clients each increment a key, then push one after the other: the second push
        is rejected, then rebased or not."""
        other = (i + k) % CLIENTS
        self.increment(i, j, a)
        self.increment(other, j, b)
        self.push(i)
        self.push(other)

    @rule(
        i=st.integers(0, CLIENTS - 1),
        k=st.integers(1, CLIENTS - 1),
        j=st.integers(0, WRITERS - 1),
        a=st.integers(0, 20),
        b=st.integers(1, 20),
        again=st.booleans(),
    )
    def cached_read(self, i: int, k: int, j: int, a: int, b: int, again: bool) -> None:
        """A writer of client ``i`` reads key x in a transaction that lands (a fast-forward:
        the local LSN stays); another client changes x and lands; the writer then writes
        key y, reading x ``again`` (SQLite serves that page from its cache: the local LSN
        has not moved) or not. Either way x is in the read set of the writer's commit,
        which must not be rebased over x."""
        c, other = self.clients[i], self.clients[(i + k) % CLIENTS]
        self.catch_up(c)  # each up to date before its write: its push of x lands
        x, y = self.key(c, a), self.key(c, a + b)
        if x == y:
            return
        self.transact(c, j, ("rmw", x), {x}, {x})
        self.push(i)
        self.catch_up(other)
        self.transact(other, 0, ("rmw", x), {x}, {x})
        self.push(other.i)
        if again:
            self.transact(c, j, ("copy", x, y), {x, y}, {y})
        else:
            self.transact(c, j, ("rmw", y), {y}, {y})
        self.push(i)
        if c.diverged:
            self.reset_client(c)

    def catch_up(self, c: Client) -> None:
        """``c`` at the server's latest with nothing pending (a reset, or a pull)."""
        if c.pending:
            self.reset_client(c)
        elif c.base != self.latest:
            self.pull(c.i)

    @rule(i=st.integers(0, CLIENTS - 1))
    def pull(self, i: int) -> None:
        c = self.clients[i]
        if c.base == self.latest:
            result = pragma(c.reader, "graft_pull")
            assert (result["pulled"], result["remote_lsn"]) == (False, c.base)
        elif c.pending:  # a pull never rebases: diverged
            with pytest.raises(apsw.SQLError, match="diverged"):
                pragma(c.reader, "graft_pull")
            c.diverged = True
        else:
            result = pragma(c.reader, "graft_pull")
            assert (result["pulled"], result["remote_lsn"]) == (True, self.latest)
            c.local += 1
            c.base = self.latest

    @precondition(lambda self: any(c.pending for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1))
    def reset(self, i: int) -> None:
        """A client with pending transactions (a diverged one first) discards them."""
        some = [c for c in self.clients if c.diverged] or [c for c in self.clients if c.pending]
        self.reset_client(some[i % len(some)])

    def reset_client(self, c: Client) -> None:
        """``c`` discards its pending transactions: it then reads the server's state, which
        holds none of them."""
        if c.diverged:
            count("reset after divergence")
        result = pragma(c.reader, "graft_reset")
        assert result["discarded_commits"] == len(c.pending)
        c.local += bool(c.pending) + (c.base != self.latest)
        assert result["local_lsn"] == c.local
        c.base, c.pending, c.diverged = self.latest, [], False
        assert rows(c.reader) == self.history[-1]

    @rule(i=st.integers(0, CLIENTS - 1), switch=st.booleans())
    def restart(self, i: int, switch: bool) -> None:
        """Close a client's connections and open them again (on the other server): pending
        commits keep their read sets, new connections start with empty ones."""
        c = self.clients[i]
        if c.pending:
            event("restart with pending commits (their read sets stay in the cache)")
        c.close()
        if switch:
            c.server = (c.server + 1) % len(self.urls)
        c.open()

    # -- the server's state ----------------------------------------------------------------

    @rule(s=st.integers(0, 1), data=st.data())
    def read_fresh(self, s: int, data: st.DataObject) -> None:
        """A client with an empty cache reads the latest LSN, or a past one, from a server."""
        lsn = data.draw(st.one_of(st.none(), st.integers(1, self.latest)))
        cache = f"{self.tmp}/{self.vid}-fresh-{uuid.uuid4().hex[:8]}"
        con = graft_vfs.connect(self.vid, remote=self.urls[s], cache_dir=cache, lsn=lsn)
        try:
            assert rows(con) == self.history[self.latest if lsn is None else lsn]
            if lsn is None:
                assert pragma(con, "graft_status")["remote_lsn"] == self.latest
        finally:
            name = con.open_vfs
            con.close()
            graft_vfs.unregister(name)

    # -- after every step ---------------------------------------------------------------------

    @invariant()
    def clients_match_the_model(self) -> None:
        for c in getattr(self, "clients", []):
            assert rows(c.reader) == c.view, f"client {c.i}"
            status = pragma(c.reader, "graft_status")
            assert status["local_lsn"] == c.local, (c.i, status)
            assert status["remote_lsn"] == c.base, (c.i, status)
            assert status["pending_push"] == len(c.pending), (c.i, status)
            assert status["diverged"] == c.diverged, (c.i, status)


@pytest.fixture
def servers(own_server):
    yield from two_servers(own_server)


def test_rebase_model(servers: list[ServerProcess], tmp_path) -> None:
    SEEN.clear()
    run_machine(RebaseModel, servers, str(tmp_path))
    print(f"rebase model, pushes by outcome: {dict(SEEN)}")  # (shown with pytest -s)
    # Rebase engaged: pushes were rebased (each one predicted by the model, which
    # every push followed), and others refused.
    assert sum(n for what, n in SEEN.items() if what.startswith("push: rebased")) >= 1, SEEN
    assert SEEN["push: diverged, a key it read changed remotely"] >= 1, SEEN
