"""A bank-transfer client for tests/test_scale_out.py, run as its own process.

    python tests/bank_worker.py VOLUME URL CACHE_DIR LOG_PATH SECONDS SEED NAME

Until SECONDS have passed it repeats: a random short pause, sometimes a pull, one
transfer (one SQL transaction that moves a random amount between two random
accounts, never below 0, and inserts a row identifying it in ``transfers``), then
``PRAGMA graft_push`` (sometimes preceded by a pull while the transfer is still
pending, which reports a newer server LSN as diverged). A transfer rejected as
diverged is recorded and followed by ``PRAGMA graft_reset``, which discards only
that unacknowledged transfer.

LOG_PATH receives one JSON object per line, flushed as it happens, so that a
worker killed by a timeout still leaves what it saw:

    {"event": "ack", "tid": ..., "src": ..., "dst": ..., "amount": ..., "remote_lsn": N}
    {"event": "rejected", "via": "push" | "pull", "tid": ..., "message": ...}
        (the push was refused, or a pull with the transfer pending found the server
        moved on: the volume is diverged)
    {"event": "reset", "tid": ..., "discarded_commits": N}
    {"event": "pull", "remote_lsn": N, "pulled": bool}
    {"event": "pull_rejected", "message": ...}
    {"event": "error", "where": ..., "message": ...}      (anything unexpected)
    {"event": "done", ...counts}
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
PUSH_ATTEMPTS = 5  # for transport errors only; a rejection is never retried


def pragma(con: apsw.Connection, name: str) -> dict:
    return json.loads(con.execute(f"PRAGMA {name}").fetchone()[0])


def is_diverged(exc: BaseException) -> bool:
    return isinstance(exc, apsw.SQLError) and "diverged" in str(exc)


def main(argv: list[str]) -> int:
    vid, url, cache, log_path, seconds, seed, name = argv
    rng = random.Random(int(seed))
    deadline = time.monotonic() + float(seconds)
    con = graft_vfs.connect(
        vid, remote=url, cache_dir=cache, options=graft_vfs.Options(autopush=False)
    )
    accounts = [row[0] for row in con.execute("SELECT id FROM accounts ORDER BY id")]
    counts = {"transfers": 0, "acks": 0, "rejections": 0, "pulls": 0, "pull_rejections": 0}
    with open(log_path, "a", buffering=1) as log:

        def record(**event) -> None:
            log.write(json.dumps(event) + "\n")

        def reset(tid: str | None) -> None:
            result = pragma(con, "graft_reset")
            record(event="reset", tid=tid, discarded_commits=result["discarded_commits"])

        seq = 0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0, MAX_PAUSE))
            if rng.random() < PULL_PROBABILITY:
                counts["pulls"] += 1
                try:
                    result = pragma(con, "graft_pull")
                    record(event="pull", remote_lsn=result["remote_lsn"], pulled=result["pulled"])
                except apsw.SQLError as exc:
                    if not is_diverged(exc):
                        raise
                    # Only possible with a local commit pending, which this loop
                    # never leaves behind here; recorded (as an error) so the test sees it.
                    counts["pull_rejections"] += 1
                    record(event="pull_rejected", message=str(exc))
                    reset(None)
                    continue

            src, dst = rng.sample(accounts, 2)
            seq += 1
            tid = f"{name}-{seq}"
            with con:  # one SQL transaction = one local commit
                (balance,) = con.execute(
                    "SELECT balance FROM accounts WHERE id = ?", (src,)
                ).fetchone()
                amount = rng.randint(0, min(balance, MAX_AMOUNT))
                con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
                con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
                con.execute(
                    "INSERT INTO transfers(tid, src, dst, amount) VALUES (?, ?, ?, ?)",
                    (tid, src, dst, amount),
                )
            counts["transfers"] += 1
            transfer = {"tid": tid, "src": src, "dst": dst, "amount": amount}

            if rng.random() < PENDING_PULL_PROBABILITY:
                # With the transfer pending, a pull that finds a newer remote LSN
                # reports the volume diverged: the transfer is rejected, not merged.
                counts["pulls"] += 1
                try:
                    result = pragma(con, "graft_pull")
                    record(event="pull", remote_lsn=result["remote_lsn"], pulled=result["pulled"])
                    if result["pulled"]:
                        record(event="error", where="pull", message=f"pulled over {tid}")
                        break
                except apsw.SQLError as exc:
                    if not is_diverged(exc):
                        raise
                    counts["rejections"] += 1
                    record(event="rejected", via="pull", message=str(exc), **transfer)
                    reset(tid)
                    continue

            for attempt in range(PUSH_ATTEMPTS):
                try:
                    result = pragma(con, "graft_push")
                except apsw.SQLError as exc:
                    if not is_diverged(exc):
                        raise
                    counts["rejections"] += 1
                    record(event="rejected", via="push", message=str(exc), **transfer)
                    reset(tid)
                    break
                except apsw.IOError as exc:  # transport: the push intent is retried as is
                    record(event="error", where="push", message=str(exc), attempt=attempt)
                    time.sleep(0.2)
                    continue
                if not result["pushed"]:
                    record(event="error", where="push", message=f"nothing pushed: {result}")
                    break
                counts["acks"] += 1
                record(event="ack", remote_lsn=result["remote_lsn"], **transfer)
                break
            else:
                record(event="error", where="push", message="gave up after transport errors")
                break

        status = pragma(con, "graft_status")
        record(event="done", status=status, **counts)
    con.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRAFT_EXIT_FLUSH_SECONDS", "0")
    sys.exit(main(sys.argv[1:]))
