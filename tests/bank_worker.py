"""A bank-transfer client for tests/test_scale_out.py, run as its own process.

    python tests/bank_worker.py VOLUME URL CACHE_DIR LOG_PATH SECONDS SEED NAME

Until SECONDS have passed it repeats: a random short pause, sometimes a pull, one
transfer (one SQL transaction that moves a random amount between two random
accounts, never below 0, and inserts a row identifying it in ``transfers``), then
``PRAGMA graft_push`` (sometimes preceded by a pull while the transfer is still
pending, which reports a newer server LSN as diverged). A transfer rejected as
diverged is recorded and followed by ``PRAGMA graft_reset``, which discards only
that unacknowledged transfer.

LOG_PATH receives one JSON object per line (each also has "t", its time.time()),
flushed as it happens, so that a worker killed by a timeout still leaves what it saw:

    {"event": "start"}                                     (connected, workload begins)
    {"event": "ack", "tid": ..., "src": ..., "dst": ..., "amount": ..., "remote_lsn": N}
    {"event": "rejected", "via": "push" | "pull", "tid": ..., "message": ...}
        (the push was refused, or a pull with the transfer pending found the server
        moved on: the volume is diverged)
    {"event": "reset", "tid": ..., "discarded_commits": N, "pending_before": N,
     "pending_after": N}
    {"event": "pull", "remote_lsn": N, "pulled": bool}
    {"event": "unavailable", "where": ..., "message": ...}  (an IOError, retried)
    {"event": "error", "message": ...}                      (the worker failed)
    {"event": "done", "status": graft_status, ...counts}

A server that is unreachable (an IOError) is retried for up to UNAVAILABLE_LIMIT
seconds: a transaction that failed to read a page is rolled back and not counted, a
push is resent as the same commit.
"""

from __future__ import annotations

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


class Diverged(Exception):
    """The volume is diverged: a transfer was rejected (message from SQLite)."""


def pragma(con: apsw.Connection, name: str) -> dict:
    return json.loads(con.execute(f"PRAGMA {name}").fetchone()[0])


class Worker:
    def __init__(self, con: apsw.Connection, log, rng: random.Random, name: str) -> None:
        self.con, self.log, self.rng, self.name = con, log, rng, name
        self.accounts = [row[0] for row in con.execute("SELECT id FROM accounts ORDER BY id")]
        self.counts = {"transfers": 0, "acks": 0, "rejections": 0, "pulls": 0, "unavailable": 0}
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
            except apsw.IOError as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                self.counts["unavailable"] += 1
                self.record(event="unavailable", where=name, message=str(exc))
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

    def pull(self) -> dict:
        self.counts["pulls"] += 1
        result = self.sync("graft_pull")
        self.record(event="pull", remote_lsn=result["remote_lsn"], pulled=result["pulled"])
        return result

    def transfer(self) -> dict | None:
        """One SQL transaction, one local commit; None if the server was unreachable."""
        src, dst = self.rng.sample(self.accounts, 2)
        self.seq += 1
        tid = f"{self.name}-{self.seq}"
        con = self.con
        try:
            con.execute("BEGIN")
            (balance,) = con.execute("SELECT balance FROM accounts WHERE id = ?", (src,)).fetchone()
            amount = self.rng.randint(0, min(balance, MAX_AMOUNT))
            con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
            con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
            con.execute(
                "INSERT INTO transfers(tid, src, dst, amount) VALUES (?, ?, ?, ?)",
                (tid, src, dst, amount),
            )
        except apsw.IOError as exc:  # a page read failed: nothing was committed
            if con.in_transaction:
                con.execute("ROLLBACK")
            self.counts["unavailable"] += 1
            self.record(event="unavailable", where="transfer", message=str(exc))
            time.sleep(RETRY_PAUSE)
            return None
        con.execute("COMMIT")  # local only: never needs the server
        self.counts["transfers"] += 1
        return {"tid": tid, "src": src, "dst": dst, "amount": amount}

    def step(self) -> None:
        time.sleep(self.rng.uniform(0, MAX_PAUSE))
        if self.rng.random() < PULL_PROBABILITY:
            # Nothing is pending here, so a pull can never report diverged.
            self.pull()
        transfer = self.transfer()
        if transfer is None:
            return
        try:
            if self.rng.random() < PENDING_PULL_PROBABILITY:
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
            raise AssertionError(f"push of {transfer} pushed nothing: {result}")
        self.counts["acks"] += 1
        self.record(event="ack", remote_lsn=result["remote_lsn"], **transfer)


def main(argv: list[str]) -> int:
    vid, url, cache, log_path, seconds, seed, name = argv
    deadline = time.monotonic() + float(seconds)
    con = graft_vfs.connect(
        vid, remote=url, cache_dir=cache, options=graft_vfs.Options(autopush=False)
    )
    with open(log_path, "a", buffering=1) as log:
        worker = Worker(con, log, random.Random(int(seed)), name)
        worker.record(event="start")
        try:
            while time.monotonic() < deadline:
                worker.step()
        except BaseException as exc:
            worker.record(event="error", message=f"{type(exc).__name__}: {exc}")
            raise
        worker.record(event="done", status=pragma(con, "graft_status"), **worker.counts)
    con.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRAFT_EXIT_FLUSH_SECONDS", "0")
    sys.exit(main(sys.argv[1:]))
