"""kill -9 at the crash points inside a commit, a push of many pages, a pull and a
checkpoint: real client and server processes, bank transfers that each change several
pages, and a total that never changes.

Each test kills a process at one point, restarts it and checks that the total is the
same, that every transfer acknowledged before the kill is there (a local commit once
SQLite was told, a push once its answer came), that the killed step left nothing half
done, and that the volume converges: a fresh replica reads what the restarted client
reads. tests/test_crash.py covers the five points of the plain commit path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import apsw
import pytest

import graft_vfs
from graft_server.keys import checkpoint_key, checkpoint_prefix, log_key
from graft_vfs.client.remote import Remote
from graft_vfs.core.protocol import MAX_INLINE_PAGES
from support.clients import child_env, pragma

START = 100  # every account starts with this balance
PAD = 1000  # bytes of padding per account: about 4 accounts per page

BANK = textwrap.dedent(
    """
    import json, random, sys, time, apsw, graft_vfs
    vid, url, cache, seed, transfers, mode = sys.argv[1:7]
    move = "UPDATE accounts SET balance = balance + ?, pad = randomblob(length(pad)) WHERE id=?"
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache,
                            options=graft_vfs.Options(autopush=False))
    def say(**kw):
        print(json.dumps(kw), flush=True)
    say(event="open")
    if mode == "pull":
        say(event="pulled", answer=json.loads(con.execute("PRAGMA graft_pull").fetchone()[0]))
    rng = random.Random(seed)
    n = con.execute("SELECT count(*) FROM accounts").fetchone()[0]
    for i in range(int(transfers)):
        tid, (a, b), amount = f"{seed}-{i}", rng.sample(range(n), 2), rng.randrange(1, 50)
        with con:  # one transaction: one local commit of several pages
            con.execute(move, (-amount, a))
            con.execute(move, (amount, b))
            if mode == "wide":  # and every other page of the table too
                con.execute("UPDATE accounts SET pad = randomblob(length(pad))")
            con.execute("INSERT INTO transfers VALUES(?, ?, ?, ?)", (tid, a, b, amount))
        say(event="committed", tid=tid)
        while True:  # a push whose answer was lost is retried with the same hash
            try:
                answer = json.loads(con.execute("PRAGMA graft_push").fetchone()[0])
                break
            except apsw.Error as exc:
                say(event="retry", error=f"{type(exc).__name__}: {exc}")
                if "diverged" in str(exc):  # the server took it for another commit
                    sys.exit(3)
                time.sleep(0.05)
        say(event="acked", tid=tid, remote_lsn=answer["remote_lsn"])
    say(event="done")
    """
)


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left():
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class Bank:
    """A bank client process on ``cache``: ``transfers`` transfers, each pushed.

    mode "wide": each transfer also rewrites every page of the table; "pull": pull first.
    """

    def __init__(
        self, vid: str, url: str, cache: str, seed: str, transfers: int, mode: str = "plain",
        crash_at: str | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BANK, vid, url, cache, seed, str(transfers), mode],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(crash_at),
        )
        self.events: list[dict] = []
        RUNNING.append(self.proc)

    def wait(self, timeout: float = 120) -> int:
        """Its exit status, once it exited; what it printed is in ``events``."""
        assert self.proc.stdout is not None
        self.events += [json.loads(line) for line in self.proc.stdout]
        return self.proc.wait(timeout=timeout)

    def next_event(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the bank client exited with {self.proc.wait()}: {self.events}"
        self.events.append(json.loads(line))
        return self.events[-1]

    def tids(self, event: str) -> list[str]:
        return [e["tid"] for e in self.events if e["event"] == event]


def open_bank(vid: str, url: str, cache: str) -> apsw.Connection:
    return graft_vfs.connect(
        vid, remote=url, cache_dir=cache, options=graft_vfs.Options(autopush=False)
    )


def close(con: apsw.Connection) -> None:
    name = con.open_vfs
    con.close()
    graft_vfs.unregister(name)


def create_bank(vid: str, url: str, cache: str, accounts: int) -> int:
    """The accounts, pushed; returns the remote LSN."""
    con = open_bank(vid, url, cache)
    with con:
        con.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER, pad BLOB)")
        con.execute("CREATE TABLE transfers(tid TEXT PRIMARY KEY, src, dst, amount)")
        con.executemany(
            "INSERT INTO accounts VALUES(?, ?, randomblob(?))",
            ((i, START, PAD) for i in range(accounts)),
        )
    lsn = pragma(con, "graft_push")["remote_lsn"]
    close(con)
    return lsn


def audit(con: apsw.Connection, accounts: int, acknowledged: list[str]) -> list[tuple]:
    """Check the invariant and that nothing acknowledged is missing; returns the state."""
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert con.execute("SELECT count(*), sum(balance) FROM accounts").fetchone() == (
        accounts,
        accounts * START,
    )
    tids = {t for (t,) in con.execute("SELECT tid FROM transfers")}
    assert set(acknowledged) <= tids, sorted(set(acknowledged) - tids)
    # every transfer recorded moved its money: the balances follow from the transfers
    moved = dict.fromkeys(range(accounts), START)
    for src, dst, amount in con.execute("SELECT src, dst, amount FROM transfers"):
        moved[src] -= amount
        moved[dst] += amount
    assert dict(con.execute("SELECT id, balance FROM accounts").fetchall()) == moved
    return con.execute("SELECT id, balance, pad FROM accounts ORDER BY id").fetchall() + [
        tuple(r) for r in con.execute("SELECT * FROM transfers ORDER BY tid")
    ]


def converged(vid: str, url: str, tmp_path, accounts: int, acknowledged: list[str], state):
    """A fresh replica reads exactly ``state``."""
    fresh = open_bank(vid, url, str(tmp_path / "fresh"))
    try:
        assert audit(fresh, accounts, acknowledged) == state
    finally:
        close(fresh)


def test_client_killed_between_segments_of_a_large_push(server, vid, tmp_path):
    """A push of more pages than one request carries uploads segments first: killed after
    the first, nothing is committed on the server, and the restarted client pushes the
    whole transfer once."""
    accounts = MAX_INLINE_PAGES * 4 + 400  # more than MAX_INLINE_PAGES pages
    cache = str(tmp_path / "cache")
    base = create_bank(vid, server.url, cache, accounts)
    segments = len(server.objects("segments/"))
    bank = Bank(vid, server.url, cache, "wide", 1, "wide", crash_at="client.push.after_segment")
    assert bank.wait() == -signal.SIGKILL
    assert bank.tids("committed") == ["wide-0"] and bank.tids("acked") == []
    assert Remote(server.url).snapshot(vid).lsn == base
    assert len(server.objects("segments/")) == segments + 1  # one uploaded, then killed

    con = open_bank(vid, server.url, cache)  # restart
    try:
        state = audit(con, accounts, ["wide-0"])  # committed locally: SQLite was told
        status = pragma(con, "graft_status")
        assert (status["pending_push"], status["push_in_flight"]) == (1, True)
        pushed = pragma(con, "graft_push")
        assert (pushed["remote_lsn"], pushed["pages"] > MAX_INLINE_PAGES) == (base + 1, True)
        assert pragma(con, "graft_status")["pending_push"] == 0
    finally:
        close(con)
    converged(vid, server.url, tmp_path, accounts, ["wide-0"], state)


def test_client_killed_before_its_local_commit_is_durable(server, vid, tmp_path):
    """Killed inside the local store's transaction: the transfer is not there (SQLite was
    never told it committed), the ones before it are, and the cache goes on."""
    accounts, cache = 400, str(tmp_path / "cache")
    base = create_bank(vid, server.url, cache, accounts)
    before = Bank(vid, server.url, cache, "before", 3)
    assert before.wait() == 0
    assert [e["remote_lsn"] for e in before.events if e["event"] == "acked"] == [
        base + 1,
        base + 2,
        base + 3,
    ]
    con = open_bank(vid, server.url, cache)
    status = pragma(con, "graft_status")
    close(con)
    assert (status["pending_push"], status["remote_lsn"]) == (0, base + 3)
    killed = Bank(vid, server.url, cache, "killed", 1, crash_at="client.commit.before_durable")
    assert killed.wait() == -signal.SIGKILL
    assert [e["event"] for e in killed.events] == ["open"]

    con = open_bank(vid, server.url, cache)  # restart
    try:
        acked = before.tids("acked")
        audit(con, accounts, acked)
        assert con.execute("SELECT count(*) FROM transfers WHERE tid = 'killed-0'").fetchone() == (
            0,
        )
        assert pragma(con, "graft_status") == status  # the same LSNs, nothing pending
    finally:
        close(con)
    after = Bank(vid, server.url, cache, "after", 2)  # the cache takes commits again
    assert after.wait() == 0
    acked += after.tids("acked")
    con = open_bank(vid, server.url, cache)
    try:
        state = audit(con, accounts, acked)
    finally:
        close(con)
    assert Remote(server.url).snapshot(vid).lsn == base + 5
    converged(vid, server.url, tmp_path, accounts, acked, state)


def test_client_killed_mid_pull(server, vid, tmp_path):
    """Killed while it records a pull: the reader's cache stays at its last snapshot, whole,
    and the next pull takes every acknowledged transfer."""
    accounts = 400
    writer, reader = str(tmp_path / "writer"), str(tmp_path / "reader")
    base = create_bank(vid, server.url, writer, accounts)
    con = open_bank(vid, server.url, reader)
    audit(con, accounts, [])  # every page read, so cached at ``base``
    close(con)
    bank = Bank(vid, server.url, writer, "w", 4)
    assert bank.wait() == 0
    acked = bank.tids("acked")
    killed = Bank(vid, server.url, reader, "r", 0, "pull", crash_at="client.pull.mid_apply")
    assert killed.wait() == -signal.SIGKILL
    assert [e["event"] for e in killed.events] == ["open"]

    con = open_bank(vid, server.url, reader)  # restart
    try:
        status = pragma(con, "graft_status")
        assert (status["remote_lsn"], status["pending_push"]) == (base, 0)
        assert status["local_lsn"] == status["synced_local_lsn"]
        audit(con, accounts, [])  # the snapshot before the pull, whole
        assert con.execute("SELECT count(*) FROM transfers").fetchone() == (0,)
        pulled = pragma(con, "graft_pull")
        assert (pulled["pulled"], pulled["remote_lsn"]) == (True, base + 4)
        state = audit(con, accounts, acked)
        assert con.execute("SELECT count(*) FROM transfers").fetchone() == (4,)
    finally:
        close(con)
    converged(vid, server.url, tmp_path, accounts, acked, state)


def test_server_killed_before_writing_a_checkpoint(own_server, vid, tmp_path):
    """The server writes a checkpoint once the log since the last one is 32 records long,
    after the commit's log record: killed there, the commit has landed unanswered. The
    client's retry is answered with that LSN (never applied twice); the restarted server
    reads the volume from the log alone and writes the missed checkpoint at its first
    commit (LSN 33), which a cold server then starts from."""
    own_server.start(GRAFT_CRASH_AT="server.checkpoint.before_write")
    url, accounts, cache = own_server.url, 400, str(tmp_path / "cache")
    base = create_bank(vid, url, cache, accounts)
    bank = Bank(vid, url, cache, "b", 36 - base)
    while bank.next_event()["event"] != "retry":  # the commit of LSN 32 got no answer
        pass
    assert own_server.proc.wait(timeout=60) == -signal.SIGKILL
    assert own_server.read_object(log_key(vid, 32)) is not None  # it had landed
    assert own_server.read_object(log_key(vid, 33)) is None
    assert own_server.objects(checkpoint_prefix(vid)) == []
    own_server.start()  # same store, same port, no crash point
    assert bank.wait() == 0
    acks = [e["remote_lsn"] for e in bank.events if e["event"] == "acked"]
    assert acks == list(range(base + 1, 37))  # each transfer exactly once, 32 included
    acked = bank.tids("acked")
    con = open_bank(vid, url, cache)
    try:
        state = audit(con, accounts, acked)
    finally:
        close(con)
    own_server.stop()
    assert own_server.objects(checkpoint_prefix(vid)) == [checkpoint_key(vid, 33)]
    own_server.start()  # a cold server: the checkpoint, then the log after it
    converged(vid, url, tmp_path, accounts, acked, state)

