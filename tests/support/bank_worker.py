"""A bank-transfer client for tests/test_scale_out.py, run as its own process.

    python tests/support/bank_worker.py VOLUME URL CACHE_DIR LOG_PATH SECONDS SEED NAME
        [--pull-in-tx P] [--faults] [--stop-file PATH] [--background] [--transactional]
        [--rebase] [--spread]

Until SECONDS have passed (with ``--stop-file``, until PATH exists, SECONDS being only
a bound) it repeats: a random short pause, sometimes a pull, one
transfer (one SQL transaction that moves a random amount between two random
accounts, never below 0, and inserts a row identifying it in ``transfers``), then
``PRAGMA graft_push`` (sometimes preceded by a pull while the transfer is still
pending, which reports a newer server LSN as diverged). A transfer rejected as
diverged is recorded and followed by ``PRAGMA graft_reset``, which discards only
that unacknowledged transfer.

``--pull-in-tx P``: with probability P after the transfer's read and again after its
writes, the worker pulls while the transaction is open. The transaction keeps its
snapshot (checked: it reads the same balance again); if the pull moved the volume on,
its first write or its COMMIT gets SQLITE_BUSY (a retried COMMIT must get it again),
and the worker rolls back, checks that nothing of the transfer is left, and runs the
same transfer again. ``--faults``: the server's store injects faults, so an
SQLITE_CORRUPT (the server refused a read that came back truncated) is transient too.
``--background``: the client also pushes and pulls in the background (``autopush`` and
``pull_interval``): a background pull may move the volume on under an open transaction
at any moment (BUSY: run again), and may find a pending transfer diverged; a
background push may push the transfer before the worker does, and then the worker's
``PRAGMA graft_push`` has nothing to push: its ack has no ``remote_lsn`` (null) and
``"by": "background"``.
``--transactional``: each transfer runs as ``graft_vfs.transaction`` (BEGIN IMMEDIATE,
commit, push at once; on a rejected push or a stale snapshot, reset, pull and run the
transfer again): no transfer is rejected or lost, no reset is the worker's to make. Each
retry is logged (``retried``), and the ack carries the LSN the transaction landed at.
``--rebase``: the client runs with ``Options(rebase=True)``: a rejected push whose
transfer read nothing the server changed is rebased and lands (an ack); only the others
are rejected. The "done" event carries the client's ``graft_stats`` (``pushes_rejected``,
``rebases``). ``--spread``: worker wN inserts its transfers at rowids from
N * SPREAD_RANGE on (the spread layout of tests/test_scale_out.py gives each range its
own leaf page), so transfers of different workers share few pages.

LOG_PATH receives one JSON object per line (each also has "t", its time.time()),
flushed as it happens, so that a worker killed by a timeout still leaves what it saw:

    {"event": "start"}                                     (connected, workload begins)
    {"event": "ack", "tid": ..., "src": ..., "dst": ..., "amount": ..., "remote_lsn": N}
    {"event": "rejected", "via": "push" | "pull", "tid": ..., "message": ...}
        (the push was refused, or a pull with the transfer pending found the server
        moved on: the volume is diverged)
    {"event": "reset", "tid": ..., "discarded_commits": N, "pending_before": N,
     "pending_after": N}
    {"event": "pull", "remote_lsn": N, "pulled": bool, "in_tx": bool}
    {"event": "retried", "tid": ..., "message": ...}     (--transactional: a conflict,
        the transfer ran again)
    {"event": "busy", "stage": "write" | "commit", "tid": ..., "message": ...}
        (a pull inside the transaction moved the volume on: rolled back, run again)
    {"event": "unavailable", "where": ..., "error": "IOError" | "CorruptError",
     "message": ...}                                        (retried)
    {"event": "error", "message": ...}                      (the worker failed)
    {"event": "done", "status": graft_status, ...counts}

A server that is unreachable (an IOError) is retried for up to UNAVAILABLE_LIMIT
seconds: a transaction that failed to read a page is rolled back and not counted, a
push is resent as the same commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import apsw

import graft_vfs

PULL_PROBABILITY = 0.5
PENDING_PULL_PROBABILITY = 0.1  # pull between a transfer's commit and its push
MAX_PAUSE = 0.03  # seconds; short enough that six workers often race for one LSN
MAX_AMOUNT = 200
UNAVAILABLE_LIMIT = 30.0  # seconds a server may stay unreachable before the worker gives up
RETRY_PAUSE = 0.2
BACKGROUND_PULL_INTERVAL = 0.05  # seconds, with --background
# With --transactional: enough that six workers racing for each LSN never run out.
TRANSACTION_ATTEMPTS = 1000
TRANSACTION_MAX_BACKOFF = 0.2  # seconds
SPREAD_RANGE = 1_000_000  # rowids of transfers per worker with --spread


class Diverged(Exception):
    """The volume is diverged: a transfer was rejected (message from SQLite)."""


def pragma(con: apsw.Connection, name: str) -> dict:
    return json.loads(con.execute(f"PRAGMA {name}").fetchone()[0])


class Worker:
    def __init__(
        self,
        con: apsw.Connection,
        log,
        rng: random.Random,
        name: str,
        pull_in_tx: float = 0.0,
        faults: bool = False,
        background: bool = False,
        transactional: bool = False,
        spread: bool = False,
    ) -> None:
        self.con, self.log, self.rng, self.name = con, log, rng, name
        self.spread = spread
        self.transactional = transactional
        self.pull_in_tx = pull_in_tx
        self.background = background
        # What a server may answer while it is unreachable or its store fails.
        self.transient: tuple[type[apsw.Error], ...] = (
            (apsw.IOError, apsw.CorruptError) if faults else (apsw.IOError,)
        )
        self.accounts = [row[0] for row in con.execute("SELECT id FROM accounts ORDER BY id")]
        self.counts = {
            "transfers": 0,
            "acks": 0,
            "rejections": 0,
            "pulls": 0,
            "busy": 0,
            "unavailable": 0,
            "acks_background": 0,
            "retried": 0,
        }
        self.seq = 0

    def record(self, **event) -> None:
        self.log.write(json.dumps({**event, "t": time.time()}) + "\n")

    def sync(self, name: str) -> dict:
        """A sync PRAGMA, retried while the server is unreachable (an IOError).

        A retried push resends the same commit (its intent is kept), which the server
        recognises if an earlier attempt landed. Raises Diverged on a rejection.
        """
        first_failure = None
        while True:
            try:
                return pragma(self.con, name)
            except apsw.SQLError as exc:
                if "diverged" not in str(exc):
                    raise
                raise Diverged(str(exc)) from exc
            except self.transient as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                self.unavailable(name, exc)
                if now - first_failure > UNAVAILABLE_LIMIT:
                    raise
                time.sleep(RETRY_PAUSE)

    def reset(self, tid: str | None) -> None:
        # pending_push comes from the local store: it needs no server. A reset retried
        # after its pull failed reports 0 discarded: the first attempt discarded them.
        before = pragma(self.con, "graft_status")["pending_push"]
        result = self.sync("graft_reset")
        after = pragma(self.con, "graft_status")["pending_push"]
        self.record(
            event="reset",
            tid=tid,
            discarded_commits=result["discarded_commits"],
            pending_before=before,
            pending_after=after,
        )

    def retrying(self, where: str, read):
        """``read()`` (a read outside any transaction), retried while the server fails."""
        first_failure = time.monotonic()
        while True:
            try:
                return read()
            except self.transient as exc:
                self.unavailable(where, exc)
                if time.monotonic() - first_failure > UNAVAILABLE_LIMIT:
                    raise
                time.sleep(RETRY_PAUSE)

    def unavailable(self, where: str, exc: apsw.Error) -> None:
        self.counts["unavailable"] += 1
        self.record(event="unavailable", where=where, error=type(exc).__name__, message=str(exc))

    def pull(self, in_tx: bool = False) -> dict:
        self.counts["pulls"] += 1
        result = self.sync("graft_pull")
        self.record(
            event="pull", remote_lsn=result["remote_lsn"], pulled=result["pulled"], in_tx=in_tx
        )
        return result

    def pull_inside(self) -> bool:
        """Sometimes pull inside the open transaction; True if the volume moved on."""
        if self.pull_in_tx and self.rng.random() < self.pull_in_tx:
            return bool(self.pull(in_tx=True)["pulled"])
        return False

    def insert(self, tid: str, src: int, dst: int, amount: int) -> None:
        """Record a transfer; with --spread at a rowid in this worker's own range."""
        rowid = None
        if self.spread:
            rowid = int(self.name.lstrip("w")) * SPREAD_RANGE + self.seq
        self.con.execute(
            "INSERT INTO transfers(rowid, tid, src, dst, amount) VALUES (?, ?, ?, ?, ?)",
            (rowid, tid, src, dst, amount),
        )

    def balance(self, account: int) -> int:
        sql = "SELECT balance FROM accounts WHERE id = ?"
        return self.con.execute(sql, (account,)).fetchone()[0]

    def transfer(self) -> dict | None:
        """One SQL transaction, one local commit; None if the server was unreachable.

        A transaction refused with BUSY because a pull inside it moved the volume on
        is rolled back and run again (the same transfer, on the new snapshot).
        """
        src, dst = self.rng.sample(self.accounts, 2)
        self.seq += 1
        tid = f"{self.name}-{self.seq}"
        con = self.con
        while True:
            moved, stage = False, "read"
            try:
                con.execute("BEGIN")
                balance = self.balance(src)
                moved = self.pull_inside()
                assert self.balance(src) == balance, "a pull changed an open transaction's data"
                amount = self.rng.randint(0, min(balance, MAX_AMOUNT))
                stage = "write"
                con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
                con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
                self.insert(tid, src, dst, amount)
                moved = self.pull_inside() or moved
                assert self.balance(src) == balance - amount, "a pull changed a transaction's data"
                stage = "commit"
                con.execute("COMMIT")  # local only: never needs the server
            except apsw.BusyError as exc:
                if not moved and not self.background:
                    raise  # nothing else writes to this cache: BUSY has no other cause
                if stage == "commit":
                    # SQLite keeps the transaction open after a BUSY commit; a retried
                    # COMMIT must be refused again, not report a commit of nothing.
                    try:
                        con.execute("COMMIT")
                    except apsw.BusyError:
                        pass
                    else:
                        raise AssertionError(f"a retried COMMIT of {tid} succeeded") from exc
                con.execute("ROLLBACK")
                sql = "SELECT 1 FROM transfers WHERE tid = ?"
                left = self.retrying("check", lambda: con.execute(sql, (tid,)).fetchall())
                assert not left, f"transfer {tid} survived its rollback"
                self.counts["busy"] += 1
                self.record(event="busy", stage=stage, tid=tid, message=str(exc))
                continue
            except self.transient as exc:  # a page read failed: nothing was committed
                if con.in_transaction:
                    con.execute("ROLLBACK")
                self.unavailable("transfer", exc)
                time.sleep(RETRY_PAUSE)
                return None
            self.counts["transfers"] += 1
            return {"tid": tid, "src": src, "dst": dst, "amount": amount}

    def transaction(self) -> None:
        """One transfer as a graft_vfs.transaction, run until it lands (--transactional)."""
        src, dst = self.rng.sample(self.accounts, 2)
        self.seq += 1
        tid = f"{self.name}-{self.seq}"
        con = self.con
        self.counts["transfers"] += 1
        tx = graft_vfs.transaction(
            con, attempts=TRANSACTION_ATTEMPTS, max_backoff=TRANSACTION_MAX_BACKOFF
        )
        for attempt in tx:
            with attempt:  # each run reads the balance of its own snapshot
                amount = self.rng.randint(0, min(self.balance(src), MAX_AMOUNT))
                con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
                con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
                self.insert(tid, src, dst, amount)
        for why in tx.conflicts:
            self.counts["retried"] += 1
            self.record(event="retried", tid=tid, message=why)
        self.counts["acks"] += 1
        self.record(
            event="ack",
            remote_lsn=tx.lsn,
            by="transaction",
            attempts=tx.attempts,
            tid=tid,
            src=src,
            dst=dst,
            amount=amount,
        )

    def step(self) -> None:
        time.sleep(self.rng.uniform(0, MAX_PAUSE))
        if self.rng.random() < PULL_PROBABILITY:
            # Nothing is pending here, so a pull can never report diverged.
            self.pull()
        if self.transactional:
            self.transaction()
            return
        transfer = self.transfer()
        if transfer is None:
            return
        try:
            # (In the background, pulls happen anyway, and the transfer may be pushed
            # already, so that a pull may rightly move the volume on.)
            if not self.background and self.rng.random() < PENDING_PULL_PROBABILITY:
                # With the transfer pending, a pull that finds a newer remote LSN
                # reports the volume diverged: the transfer is rejected, not merged.
                via = "pull"
                if self.pull()["pulled"]:
                    raise AssertionError(f"a pull went over pending transfer {transfer}")
            via = "push"
            result = self.sync("graft_push")
        except Diverged as exc:
            self.counts["rejections"] += 1
            self.record(event="rejected", via=via, message=str(exc), **transfer)
            self.reset(transfer["tid"])
            return
        if not result["pushed"]:
            status = pragma(self.con, "graft_status")
            if not self.background or status["pending_push"] or status["diverged"]:
                raise AssertionError(f"push of {transfer} pushed nothing: {result}, {status}")
            self.counts["acks"] += 1
            self.counts["acks_background"] += 1
            self.record(event="ack", remote_lsn=None, by="background", **transfer)
            return
        self.counts["acks"] += 1
        self.record(event="ack", remote_lsn=result["remote_lsn"], by="push", **transfer)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bank_worker.py")
    for arg in ("vid", "url", "cache", "log_path", "seconds", "seed", "name"):
        parser.add_argument(arg)
    parser.add_argument("--pull-in-tx", type=float, default=0.0)
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--stop-file")
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--transactional", action="store_true")
    parser.add_argument("--rebase", action="store_true")
    parser.add_argument("--spread", action="store_true")
    args = parser.parse_args(argv)
    options = (
        graft_vfs.Options(autopush=True, pull_interval=BACKGROUND_PULL_INTERVAL, rebase=args.rebase)
        if args.background
        else graft_vfs.Options(autopush=False, rebase=args.rebase)
    )
    con = graft_vfs.connect(args.vid, remote=args.url, cache_dir=args.cache, options=options)
    # The workload's seconds count from here: a slow start (a loaded machine) shortens no run.
    deadline = time.monotonic() + float(args.seconds)
    with open(args.log_path, "a", buffering=1) as log:
        rng = random.Random(int(args.seed))
        worker = Worker(
            con,
            log,
            rng,
            args.name,
            args.pull_in_tx,
            args.faults,
            args.background,
            args.transactional,
            args.spread,
        )
        worker.record(event="start")
        try:
            while time.monotonic() < deadline:
                if args.stop_file and os.path.exists(args.stop_file):
                    break
                worker.step()
        except BaseException as exc:
            worker.record(event="error", message=f"{type(exc).__name__}: {exc}")
            raise
        worker.record(
            event="done",
            status=pragma(con, "graft_status"),
            stats=pragma(con, "graft_stats"),
            **worker.counts,
        )
    con.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRAFT_EXIT_FLUSH_SECONDS", "0")
    sys.exit(main(sys.argv[1:]))
