"""The bank workload under object-store faults, with pulls inside open transactions.

The invariant test storage engines use, run by tests/test_scale_out.py's ``bank_run``
(six tests/support/bank_worker.py processes racing transfers through three servers on one
store), here with every server running tests/support/faulty.py: each store call (get,
get_range, put, put_if_absent, list, delete) fails, is delayed, or completes only in
part (a write that lands but reports an error, a truncated read, a short listing) at
a few percent, and the test switches the faults on and off every second through the
plan's control file. The workers also pull inside open transactions: the transaction
keeps its snapshot, and if the pull moved the volume on, its first write or its
COMMIT gets SQLITE_BUSY and the worker rolls back and runs it again.

With the faults off, everything ``bank_run`` checks must hold: a gapless log that
every server agrees on, each acknowledged transfer present exactly once (at the LSN
it was acknowledged with, also at sampled past LSNs), each rejected one absent, each
account equal to its initial balance plus its transfers, the total unchanged, and
``PRAGMA integrity_check`` ok on a fresh replica. Each server writes the faults it
injected when it stops; the test prints them per kind and requires every kind.

``GRAFT_SOAK_SECONDS`` lengthens the workload (``make soak``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter

import pytest

from support.faulty import KINDS, FaultPlan
from support.servers import ServerProcess, start_all
from test_scale_out import SERVERS, WORKER_GRACE, bank_run

WORKLOAD_SECONDS = float(os.environ.get("GRAFT_SOAK_SECONDS", "6"))
FAULT_RATE = 0.03  # per call and kind: about 9% of store calls are faulted while on
FAULT_DELAY = 0.005  # seconds
FLIP_SECONDS = 1.0  # faults on for a second, off for a second, ...
PULL_IN_TX = 0.2  # per transaction, after its read and again after its writes
FAULTY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "faulty.py")


@dataclasses.dataclass
class FaultyServer(ServerProcess):
    """A graft server whose store injects faults: ``python tests/support/faulty.py STORE PORT``."""

    def command(self) -> list[str]:
        return [sys.executable, FAULTY, self.store, str(self.port)]


def switch(control, on: bool) -> None:
    """Turn the servers' faults on or off (atomically: a reader never sees half a file)."""
    tmp = f"{control}.tmp"
    with open(tmp, "w") as f:
        f.write("on" if on else "off")
    os.replace(tmp, control)


@pytest.fixture
def faulty_servers(own_server, tmp_path):
    """Three faulty servers on one fresh store of ``own_server``'s kind, faults off.

    Yields the servers, the control file and each server's fault-count file.
    """
    control = tmp_path / "faults.control"
    switch(control, False)
    counts = [tmp_path / f"faults{k}.json" for k in range(SERVERS)]
    template = {f.name: getattr(own_server, f.name) for f in dataclasses.fields(ServerProcess)}
    procs: list[ServerProcess] = []
    try:
        for k in range(SERVERS):
            plan = FaultPlan.everywhere(FAULT_RATE, seed=1000 + k, delay=FAULT_DELAY)
            env = {
                **own_server.env,
                "GRAFT_TEST_FAULTS": plan.to_json(),
                "GRAFT_TEST_FAULTS_CONTROL": str(control),
                "GRAFT_TEST_FAULTS_COUNTS": str(counts[k]),
            }
            if own_server.s3_endpoint:
                env["GRAFT_S3_ENDPOINT"] = own_server.s3_endpoint
            procs.append(FaultyServer(**{**template, "port": 0, "proc": None, "env": env}))
        yield start_all(procs), control, counts
    finally:
        for srv in procs:
            srv.stop()


@pytest.mark.timeout(WORKLOAD_SECONDS + WORKER_GRACE + 240)
def test_bank_transfers_with_store_faults_and_pulls_in_transactions(
    faulty_servers, tmp_path, vid, connect
):
    servers, control, count_files = faulty_servers
    flips = 0

    def flip_faults(servers: list[ServerProcess]) -> None:
        nonlocal flips
        end = time.monotonic() + WORKLOAD_SECONDS
        on = False
        while (left := end - time.monotonic()) > 0:
            on = not on
            switch(control, on)
            flips += 1
            time.sleep(min(FLIP_SECONDS, left))
        switch(control, False)  # the checks after the workload run without faults

    args = ("--pull-in-tx", str(PULL_IN_TX), "--faults")
    counts = bank_run(
        servers, tmp_path, vid, connect, WORKLOAD_SECONDS, flip_faults, worker_args=args
    )
    for srv in servers:
        srv.stop()  # each writes the faults it injected
    injected: Counter[str] = Counter()
    for path in count_files:
        with open(path) as f:
            injected.update(json.load(f))
    by_kind = {
        kind: sum(n for k, n in injected.items() if k.endswith(f".{kind}")) for kind in KINDS
    }
    print(f"bank under faults: {flips} switches, injected {by_kind}")
    print(f"bank under faults: by call {dict(sorted((k, n) for k, n in injected.items() if n))}")
    assert flips >= 2
    assert all(by_kind[kind] > 0 for kind in KINDS), by_kind
    assert counts["pulls_in_transaction"] > 0
