"""Scale-out proof: three server processes on one store, six clients racing to commit.

Each client runs tests/support/bank_worker.py against one of the servers (round-robin):
bank transfers, each one SQL transaction plus a push, with random pauses and
pulls. Pushes race for the next LSN across server processes; the store's
create-only write decides every race. At the end the test checks, through the
servers' HTTP API and a fresh replica with an empty cache:

- the log is gapless (1..latest) and every server agrees on the latest LSN;
- every LSN after the setup was acknowledged to exactly one client, and no LSN
  was acknowledged twice;
- every acknowledged transfer is in the final state, and the state at a sample
  of past LSNs holds exactly the transfers acknowledged up to that LSN;
- every transfer a client committed locally was either acknowledged or rejected
  with a "diverged" error (rejections happen: the workload is tuned for them),
  and no rejected transfer is in the final state or any sampled past one;
- the total balance is unchanged, each account equals its initial balance plus
  its acknowledged transfers, none is negative; ``PRAGMA integrity_check`` is ok.

``GRAFT_SOAK_SECONDS`` lengthens the workload (``make soak``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import graft_vfs
from graft_vfs.client.remote import Remote
from support.bank_worker import SPREAD_RANGE
from support.clients import pragma
from support.servers import STORE_KINDS, ServerProcess, start_all

SERVERS = 3
WORKERS = 6
ACCOUNTS = 20
INITIAL_BALANCE = 1000
WORKLOAD_SECONDS = float(os.environ.get("GRAFT_SOAK_SECONDS", "5"))
BACKGROUND_SOAK_SECONDS = float(os.environ.get("GRAFT_SOAK_SECONDS", "0"))
# The restart test ends on its workers' progress; a soak goes on killing servers this long.
RESTART_SOAK_SECONDS = float(os.environ.get("GRAFT_SOAK_SECONDS", "0"))
PROGRESS_BOUND = 90.0  # seconds the workers may take to show the progress a step waits for
SHORT_OUTAGE = 0.3  # seconds a server stays down when its clients are to ride it out
WORKER_GRACE = 60.0  # beyond the workload, before a worker is killed as hung
PAST_LSN_SAMPLES = 8
SPREAD_ACCOUNTS = 200  # two racing transfers rarely share an account
SPREAD_PAD = 3000  # bytes: one account (or placeholder transfer) per page in a spread layout
# The variants marked CLIENT_VARIANT differ from test_three_servers_six_clients_bank_transfers
# in what the clients do (background sync, transactions, rebase, the spread layout), not in
# what they ask of the store: the store deciding the LSN races is proven on every store kind
# by that test, by the restart test and by tests/test_bank_faults.py. So `make test` runs
# them on the directory store only, and `make soak` (GRAFT_SOAK_SECONDS set) on every kind.
SOAK = "GRAFT_SOAK_SECONDS" in os.environ
CLIENT_VARIANT = pytest.mark.stores(*(STORE_KINDS if SOAK else ("fs",)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "bank_worker.py")


@pytest.fixture
def servers(own_server):
    """Three server processes on one fresh store.

    ``own_server`` (not started here) is only the template: its store spec and
    environment, a directory or an S3 prefix of the kind ``--stores`` selects.
    """
    procs = [dataclasses.replace(own_server, port=0, proc=None) for _ in range(SERVERS)]
    try:
        yield start_all(procs)
    finally:
        for srv in procs:
            srv.stop()


def worker_log(tmp_path, i: int) -> str:
    return str(tmp_path / f"worker{i}.jsonl")


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_workers(
    vid: str,
    servers: list[ServerProcess],
    tmp_path,
    seconds: float,
    during=None,
    worker_args: tuple[str, ...] = (),
) -> list[list[dict]]:
    """Run the workers for ``seconds`` (killed by PID if hung); return their event logs.

    ``during(servers)``, if given, runs in this process once every worker is connected.
    ``worker_args`` are extra options of tests/support/bank_worker.py.
    """
    env = {**os.environ, "GRAFT_EXIT_FLUSH_SECONDS": "0"}
    env.pop("GRAFT_CRASH_AT", None)
    logs = [worker_log(tmp_path, i) for i in range(WORKERS)]
    procs: list[subprocess.Popen] = []
    errs = [open(tmp_path / f"worker{i}.stderr", "w+") for i in range(WORKERS)]
    seed = random.randrange(1 << 30)
    bound = " at most (until a stop file)" if "--stop-file" in worker_args else ""
    print(f"scale-out: seed {seed}, {seconds:g} s workload{bound}")
    try:
        for i in range(WORKERS):
            url = servers[i % len(servers)].url
            cmd = [sys.executable, WORKER, vid, url, str(tmp_path / f"cache{i}"), logs[i]]
            cmd += [str(seconds), str(seed + i), f"w{i}", *worker_args]
            procs.append(subprocess.Popen(cmd, env=env, stderr=errs[i]))
        deadline = time.monotonic() + seconds + WORKER_GRACE
        if during is not None:
            while not all(read_log(path) for path in logs):  # every worker is connected
                assert time.monotonic() < deadline, "workers did not start"
                assert all(proc.poll() is None for proc in procs), "a worker exited early"
                time.sleep(0.05)
            during(servers)
        for i, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {i} still running {WORKER_GRACE:g} s after its deadline")
            errs[i].seek(0)
            assert proc.returncode == 0, f"worker {i} exited {proc.returncode}:\n{errs[i].read()}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for f in errs:
            f.close()
    return [read_log(path) for path in logs]


def bank_run(
    servers,
    tmp_path,
    vid,
    connect,
    seconds: float,
    during=None,
    logs_out: list | None = None,
    worker_args: tuple[str, ...] = (),
    spread: bool = False,
    accounts: int = ACCOUNTS,
) -> dict:
    """Set up the bank, run the workers, check everything; return the counts.

    ``logs_out``, if given, receives each worker's event log; ``worker_args`` are
    extra options of tests/support/bank_worker.py. With ``--transactional`` among them,
    no transfer may be rejected: conflicts must have been retried instead. ``spread``
    (with ``accounts`` accounts) lays the bank out so that transfers of different
    workers share few pages: each account on its own page, ``transfers`` without an
    index on tid and with a padded placeholder row per worker's rowid range, and
    workers run with ``--spread``, so each inserts into its own leaf. That is what a
    rebase (``--rebase``) needs to land concurrent transfers.
    """
    transactional = "--transactional" in worker_args
    opts = graft_vfs.Options(autopush=False)
    setup = connect(vid, remote=servers[0].url, cache_dir=str(tmp_path / "setup"), options=opts)
    with setup:
        if spread:
            setup.execute(
                "CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL, pad TEXT)"
            )
            # No index on tid: its leaf would be shared by every insert.
            setup.execute(
                "CREATE TABLE transfers(tid TEXT NOT NULL, src INTEGER, dst INTEGER, "
                "amount INTEGER, pad TEXT)"
            )
            setup.executemany(
                "INSERT INTO transfers(rowid, tid, pad) VALUES (?, ?, ?)",
                (
                    (i * SPREAD_RANGE, f"placeholder{i}", "p" * SPREAD_PAD)
                    for i in range(WORKERS + 1)
                ),
            )
            setup.executemany(
                "INSERT INTO accounts VALUES (?, ?, ?)",
                ((i, INITIAL_BALANCE, "p" * SPREAD_PAD) for i in range(1, accounts + 1)),
            )
        else:
            setup.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
            setup.execute(
                "CREATE TABLE transfers(tid TEXT PRIMARY KEY, src INTEGER, dst INTEGER, "
                "amount INTEGER)"
            )
            setup.executemany(
                "INSERT INTO accounts VALUES (?, ?)",
                ((i, INITIAL_BALANCE) for i in range(1, accounts + 1)),
            )
    base_lsn = pragma(setup, "graft_push")["remote_lsn"]
    assert base_lsn == 1

    logs = run_workers(vid, servers, tmp_path, seconds, during, worker_args)
    if logs_out is not None:
        logs_out.extend(logs)

    # What the clients were told.
    acks: list[dict] = []
    rejected: list[dict] = []
    for i, events in enumerate(logs):
        errors = [e for e in events if e["event"] == "error"]
        assert not errors, f"worker {i}: {errors}"
        unavailable = [e for e in events if e["event"] == "unavailable"]
        assert during is not None or not unavailable, f"worker {i}: {unavailable[:3]}"
        done = [e for e in events if e["event"] == "done"]
        assert len(done) == 1, f"worker {i} did not finish: {events[-3:]}"
        assert done[0]["status"]["pending_push"] == 0 and not done[0]["status"]["diverged"]
        assert done[0]["transfers"] == done[0]["acks"] + done[0]["rejections"]
        acks += [e for e in events if e["event"] == "ack"]
        rejected += [e for e in events if e["event"] == "rejected"]
        # Each rejection was followed by a reset that discarded exactly that transfer
        # (a reset retried after its pull failed reports 0 the second time).
        resets = [e for e in events if e["event"] == "reset"]
        assert [r["tid"] for r in resets] == [e["tid"] for e in events if e["event"] == "rejected"]
        for r in resets:
            assert (r["pending_before"], r["pending_after"]) == (1, 0), r
            assert r["discarded_commits"] == 1 or (unavailable and r["discarded_commits"] == 0)
    every = [e for events in logs for e in events]
    counts = {
        "transfers": len(acks) + len(rejected),
        "acks": len(acks),
        "conflicts": len(rejected),
        "conflicts_by_pull": sum(e["via"] == "pull" for e in rejected),
        "pulls": sum(e["event"] == "pull" for e in every),
        "pulls_in_transaction": sum(e["event"] == "pull" and e.get("in_tx", False) for e in every),
        "busy_retried": sum(e["event"] == "busy" for e in every),
        "unavailable": sum(e["event"] == "unavailable" for e in every),
        "acks_background": sum(e["event"] == "ack" and e["by"] == "background" for e in every),
        "retried": sum(e["event"] == "retried" for e in every),
        "unavailable_corrupt": sum(
            e["event"] == "unavailable" and e.get("error") == "CorruptError" for e in every
        ),
        "pushes_rejected": sum(
            e["stats"]["pushes_rejected"] for e in every if e["event"] == "done"
        ),
        "rebased": sum(e["stats"]["rebases"] for e in every if e["event"] == "done"),
    }
    print(f"scale-out: {counts}")
    assert len(acks) >= WORKERS, "too few pushes were acknowledged to prove anything"
    by_push = sum(e["via"] == "push" for e in rejected)
    if transactional:
        # Every transfer a worker began was acknowledged (done: transfers == acks).
        assert not rejected, f"transactions lost transfers: {rejected[:3]}"
        retried_pushes = sum(
            e["event"] == "retried" and e["message"].startswith("push rejected") for e in every
        )
        assert retried_pushes >= 3, "pushes did not race: the test would not test conflicts"
    elif "--rebase" in worker_args:
        # Rebased pushes were rejected first, then landed: the races happened all the same.
        raced = counts["pushes_rejected"]
        assert raced >= 3, "pushes did not race: the test would not test conflicts"
    else:
        assert by_push >= 3, "pushes did not race: the test would not test conflicts"
    for e in rejected:
        assert "diverged" in e["message"] and "graft_reset" in e["message"]

    # The log: gapless, and every server agrees on where it ends.
    remotes = [Remote(srv.url) for srv in servers]
    latest = remotes[0].snapshot(vid).lsn
    assert [r.snapshot(vid).lsn for r in remotes] == [latest] * SERVERS
    for n in range(1, latest + 1):
        assert remotes[n % SERVERS].log_entry(vid, n) is not None, f"LSN {n} is missing"
    assert remotes[0].log_entry(vid, latest + 1) is None
    # Every commit after the setup is exactly one acknowledged transfer. (A transfer
    # pushed in the background, --background, was acknowledged to the client's
    # background push: the worker knows that it landed, not at which LSN.)
    assert latest - base_lsn == len(acks), "a commit that is no acknowledged transfer"
    acked_lsns = Counter(e["remote_lsn"] for e in acks if e["remote_lsn"] is not None)
    twice = [lsn for lsn, count in acked_lsns.items() if count > 1]
    assert not twice, f"LSNs acknowledged to more than one push: {twice}"
    assert set(acked_lsns) <= set(range(base_lsn + 1, latest + 1))
    by_lsn = {e["remote_lsn"]: e for e in acks if e["remote_lsn"] is not None}
    acked_tids = {e["tid"] for e in acks}

    # The final state, read by a fresh replica (empty cache) through another server.
    replica = connect(vid, remote=servers[1].url, cache_dir=str(tmp_path / "fresh"))
    assert pragma(replica, "graft_snapshot")["remote_lsn"] == latest
    assert replica.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    real = " WHERE src IS NOT NULL"  # not the placeholder rows of a spread layout
    rows = replica.execute("SELECT tid, src, dst, amount FROM transfers" + real).fetchall()
    final = {tid: {"tid": tid, "src": s, "dst": d, "amount": a} for tid, s, d, a in rows}
    assert final == {e["tid"]: {k: e[k] for k in ("tid", "src", "dst", "amount")} for e in acks}
    assert not {e["tid"] for e in rejected} & set(final)
    expected = {i: INITIAL_BALANCE for i in range(1, accounts + 1)}
    for e in acks:
        expected[e["src"]] -= e["amount"]
        expected[e["dst"]] += e["amount"]
    balances = dict(replica.execute("SELECT id, balance FROM accounts").fetchall())
    assert balances == expected
    assert sum(balances.values()) == accounts * INITIAL_BALANCE
    assert min(balances.values()) >= 0

    # Past LSNs: the state at LSN n holds exactly the transfers acknowledged at 2..n
    # (those acknowledged in the background: n - 1 acknowledged transfers, one per LSN,
    # and every one whose LSN is known where it belongs).
    rng = random.Random(latest)
    sample = sorted(rng.sample(range(base_lsn, latest + 1), min(PAST_LSN_SAMPLES, latest)))
    for n in sample:
        k = n % SERVERS  # one client (cache dir) per server, reused across LSNs
        past = connect(vid, remote=servers[k].url, cache_dir=str(tmp_path / f"past{k}"), lsn=n)
        tids = {tid for (tid,) in past.execute("SELECT tid FROM transfers" + real)}
        assert len(tids) == n - base_lsn and tids <= acked_tids, f"at LSN {n}"
        for m, e in by_lsn.items():
            assert (e["tid"] in tids) == (m <= n), f"{e['tid']} (LSN {m}) at LSN {n}"
        total = past.execute("SELECT sum(balance), min(balance) FROM accounts").fetchone()
        assert total[0] == accounts * INITIAL_BALANCE and total[1] >= 0, f"at LSN {n}"
    return counts


@pytest.mark.timeout(WORKLOAD_SECONDS + WORKER_GRACE + 240)
def test_three_servers_six_clients_bank_transfers(servers, tmp_path, vid, connect):
    bank_run(servers, tmp_path, vid, connect, WORKLOAD_SECONDS)


@CLIENT_VARIANT
@pytest.mark.timeout(BACKGROUND_SOAK_SECONDS + PROGRESS_BOUND + WORKER_GRACE + 240)
def test_bank_transfers_with_background_push_and_pull(servers, tmp_path, vid, connect):
    """The same workload with every client also pushing and pulling in the background
    (``autopush``, ``pull_interval``): pulls land under open transactions and pending
    transfers at any moment, pushes race the worker's own. The workers stop once each
    of those has happened (a soak: after GRAFT_SOAK_SECONDS as well)."""
    stop = tmp_path / "stop"

    def seen(event: str, **fields) -> int:
        every = [e for i in range(WORKERS) for e in read_log(worker_log(tmp_path, i))]
        return sum(e["event"] == event and fields.items() <= e.items() for e in every)

    def enough(servers: list[ServerProcess]) -> None:
        soak_end = time.monotonic() + BACKGROUND_SOAK_SECONDS
        await_progress(
            "the background did not push, pull under a transaction and race",
            lambda: (
                seen("ack", by="background") > 0
                and seen("busy") > 0
                and seen("rejected", via="push") >= 3
                and seen("ack") >= WORKERS
            ),
        )
        while time.monotonic() < soak_end:
            time.sleep(0.2)
        stop.touch()

    seconds = BACKGROUND_SOAK_SECONDS + PROGRESS_BOUND  # a bound: the stop file ends it
    args = ("--background", "--stop-file", str(stop))
    counts = bank_run(servers, tmp_path, vid, connect, seconds, enough, worker_args=args)
    assert counts["acks_background"] > 0 and counts["busy_retried"] > 0


@CLIENT_VARIANT
@pytest.mark.timeout(WORKLOAD_SECONDS + WORKER_GRACE + 240)
def test_bank_transfers_as_retried_transactions_lose_none(servers, tmp_path, vid, connect):
    """The same workload with each transfer a ``graft_vfs.transaction``: a rejected push
    resets and runs the transfer again, so every transfer a worker began is acknowledged
    and in the final state, none is rejected, and no worker resets by hand."""
    args = ("--transactional",)
    logs: list[list[dict]] = []
    counts = bank_run(
        servers, tmp_path, vid, connect, WORKLOAD_SECONDS, logs_out=logs, worker_args=args
    )
    assert counts["conflicts"] == 0 and counts["retried"] >= 3
    for events in logs:
        assert not [e for e in events if e["event"] in ("reset", "rejected")]
        done = [e for e in events if e["event"] == "done"][0]
        assert done["transfers"] == done["acks"] > 0
        acks = [e for e in events if e["event"] == "ack"]
        assert all(e["by"] == "transaction" and e["remote_lsn"] for e in acks)


@CLIENT_VARIANT
@pytest.mark.timeout(WORKLOAD_SECONDS + WORKER_GRACE + 240)
def test_bank_transfers_with_rebase_keep_every_invariant(servers, tmp_path, vid, connect):
    """The workload with ``Options(rebase=True)``: every transfer reads and writes the one
    page holding all accounts, so a rejected push is almost never rebasable; each
    invariant holds whatever was rebased, and nothing rebased when it read a changed page."""
    counts = bank_run(servers, tmp_path, vid, connect, WORKLOAD_SECONDS, worker_args=("--rebase",))
    assert (
        counts["pushes_rejected"]
        == counts["rebased"] + counts["conflicts"] - counts["conflicts_by_pull"]
    )


@CLIENT_VARIANT
@pytest.mark.timeout(2 * (WORKLOAD_SECONDS + WORKER_GRACE) + 480)
def test_bank_transfers_spread_rejected_pushes_with_and_without_rebase(
    servers, tmp_path, vid, connect
):
    """The spread layout (transfers share few pages) run without, then with, rebase: every
    invariant holds in both, and rebased pushes land instead of being rejected. The
    rejected pushes of both runs are printed (the closing note's comparison)."""
    runs = {}
    for name, args in (("without", ("--spread",)), ("with", ("--spread", "--rebase"))):
        (tmp_path / name).mkdir()
        runs[name] = bank_run(
            servers,
            tmp_path / name,
            f"{vid}-{name}",
            connect,
            WORKLOAD_SECONDS,
            worker_args=args,
            spread=True,
            accounts=SPREAD_ACCOUNTS,
        )
    without, with_rebase = runs["without"], runs["with"]
    print(
        "scale-out rebase: transfers rejected at push "
        f"{without['conflicts'] - without['conflicts_by_pull']} of {without['transfers']} "
        f"without rebase, {with_rebase['conflicts'] - with_rebase['conflicts_by_pull']} of "
        f"{with_rebase['transfers']} with rebase ({with_rebase['rebased']} rebased of "
        f"{with_rebase['pushes_rejected']} rejected pushes)"
    )
    assert without["rebased"] == 0 and with_rebase["rebased"] > 0


def events_through(tmp_path, k: int) -> list[dict]:
    """What the workers on server ``k`` logged so far (worker i uses server i % SERVERS)."""
    return [e for i in range(k, WORKERS, SERVERS) for e in read_log(worker_log(tmp_path, i))]


def await_progress(what: str, done) -> None:
    """Wait until ``done()``; fail if the workers show no such progress in PROGRESS_BOUND s."""
    deadline = time.monotonic() + PROGRESS_BOUND
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {PROGRESS_BOUND:g} s")
        time.sleep(0.05)


@pytest.mark.timeout(RESTART_SOAK_SECONDS + 8 * PROGRESS_BOUND + WORKER_GRACE + 240)
def test_servers_killed_and_restarted_mid_run_lose_nothing(servers, tmp_path, vid, connect):
    """kill -9 two of the three servers in turn while their clients push through them.

    Each step waits for the workers' progress, never for the clock: a server is killed
    once its clients have had a push acknowledged through it, and after its restart the
    next step waits until they have one again. The first server is back within the
    clients' HTTP retries; the second stays down until its clients have seen IOErrors,
    so they retry their pushes as the same commits. The workers stop (a stop file)
    once pushes have also raced (bank_run needs 3 rejected). A soak goes on killing a
    server in turn for GRAFT_SOAK_SECONDS.
    """
    stop = tmp_path / "stop"
    restarts: list[str] = []

    def acked_through(k: int, since: float) -> bool:
        return any(e["event"] == "ack" and e["t"] > since for e in events_through(tmp_path, k))

    def unavailable_through(k: int, since: float) -> bool:
        events = events_through(tmp_path, k)
        return any(e["event"] == "unavailable" and e["t"] > since for e in events)

    def rejected_pushes() -> int:
        every = [e for i in range(WORKERS) for e in read_log(worker_log(tmp_path, i))]
        return sum(e["event"] == "rejected" and e["via"] == "push" for e in every)

    def kill_and_restart(k: int, wait_unavailable: bool) -> None:
        victim = servers[k]
        since = time.time()
        await_progress(f"no ack through {victim.url}", lambda: acked_through(k, since))
        killed = time.time()
        assert victim.kill() == -signal.SIGKILL
        if wait_unavailable:
            await_progress(
                f"no client saw {victim.url} down", lambda: unavailable_through(k, killed)
            )
        else:
            time.sleep(SHORT_OUTAGE)
        victim.start()  # same store, same port
        restarts.append(victim.url)
        restarted = time.time()
        await_progress(
            f"no ack through {victim.url} after its restart", lambda: acked_through(k, restarted)
        )

    def chaos(servers: list[ServerProcess]) -> None:
        soak_end = time.monotonic() + RESTART_SOAK_SECONDS
        kill_and_restart(0, wait_unavailable=False)
        kill_and_restart(2, wait_unavailable=True)
        n = 2
        while time.monotonic() < soak_end:
            kill_and_restart(n % SERVERS, wait_unavailable=bool(n % 2))
            n += 1
        await_progress("pushes did not race", lambda: rejected_pushes() >= 3)
        stop.touch()

    seconds = RESTART_SOAK_SECONDS + 8 * PROGRESS_BOUND  # a bound: the stop file ends it
    args = ("--stop-file", str(stop))
    counts = bank_run(servers, tmp_path, vid, connect, seconds, chaos, worker_args=args)
    assert restarts[:2] == [servers[0].url, servers[2].url]
    assert counts["unavailable"] > 0, "no client saw the server that stayed down"
