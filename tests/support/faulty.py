"""A fault-injecting ObjectStore wrapper, for tests only.

Each kind of call can be made to fail before doing anything, to be delayed, or to
complete only partly: a write that lands but reports an error (a lost answer), a
read that returns truncated bytes, a listing that misses its last keys, a delete
that happens but reports an error. Faults are drawn from a seeded random generator
with per-call probabilities, and can be switched on and off while the store is in
use (``enabled``), or from another process through a control file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from graft_server.objstore import ObjectStore
from graft_vfs.core.errors import StorageError

CALLS = ("get", "get_range", "put", "put_if_absent", "list", "delete")
KINDS = ("fail", "delay", "partial")


@dataclass
class FaultPlan:
    """Per call, the probability of each fault kind; ``delay`` is seconds of sleep."""

    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    delay: float = 0.01
    seed: int = 0

    @classmethod
    def everywhere(cls, rate: float, seed: int = 0, delay: float = 0.005) -> FaultPlan:
        return cls({c: {k: rate for k in KINDS} for c in CALLS}, delay, seed)

    def to_json(self) -> str:
        return json.dumps({"rates": self.rates, "delay": self.delay, "seed": self.seed})

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        d = json.loads(text)
        return cls(d["rates"], d["delay"], d["seed"])


class FaultyStore:
    """Wraps a store; injects the faults of a plan while ``enabled``."""

    def __init__(self, inner: ObjectStore, plan: FaultPlan, control: str | None = None) -> None:
        self.inner = inner
        self.plan = plan
        self.enabled = True
        self.control = control  # a file holding "on" or "off", read at most every 50 ms
        self.injected: dict[str, int] = {f"{c}.{k}": 0 for c in CALLS for k in KINDS}
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._checked = 0.0

    @property
    def stats(self) -> dict[str, int]:
        return self.inner.stats

    def _active(self) -> bool:
        if self.control is not None and time.monotonic() - self._checked > 0.05:
            self._checked = time.monotonic()
            try:
                with open(self.control) as f:
                    self.enabled = f.read().strip() != "off"
            except FileNotFoundError:
                pass
        return self.enabled

    def _draw(self, call: str) -> str | None:
        if not self._active():
            return None
        rates = self.plan.rates.get(call, {})
        with self._lock:
            for kind in KINDS:
                if self._rng.random() < rates.get(kind, 0.0):
                    self.injected[f"{call}.{kind}"] += 1
                    return kind
        return None

    def _fail(self, call: str, key: str) -> StorageError:
        return StorageError(f"injected fault: {call} {key}")

    def check(self) -> None:
        self.inner.check()  # start-up is not where faults are injected

    def get(self, key: str) -> bytes | None:
        fault = self._draw("get")
        if fault == "fail":
            raise self._fail("get", key)
        if fault == "delay":
            time.sleep(self.plan.delay)
        data = self.inner.get(key)
        if fault == "partial" and data:
            return data[: len(data) // 2]
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        fault = self._draw("get_range")
        if fault == "fail":
            raise self._fail("get_range", key)
        if fault == "delay":
            time.sleep(self.plan.delay)
        data = self.inner.get_range(key, start, length)
        if fault == "partial" and data:
            return data[: len(data) // 2]
        return data

    def put(self, key: str, data: bytes) -> None:
        fault = self._draw("put")
        if fault == "fail":
            raise self._fail("put", key)
        if fault == "delay":
            time.sleep(self.plan.delay)
        self.inner.put(key, data)
        if fault == "partial":
            raise self._fail("put (landed)", key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        fault = self._draw("put_if_absent")
        if fault == "fail":
            raise self._fail("put_if_absent", key)
        if fault == "delay":
            time.sleep(self.plan.delay)
        created = self.inner.put_if_absent(key, data)
        if fault == "partial":
            raise self._fail("put_if_absent (landed)" if created else "put_if_absent", key)
        return created

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        fault = self._draw("list")
        if fault == "fail":
            raise self._fail("list", prefix)
        if fault == "delay":
            time.sleep(self.plan.delay)
        keys = self.inner.list(prefix, start_after=start_after)
        if fault == "partial":
            return keys[: len(keys) // 2]
        return keys

    def delete(self, key: str) -> None:
        fault = self._draw("delete")
        if fault == "fail":
            raise self._fail("delete", key)
        if fault == "delay":
            time.sleep(self.plan.delay)
        self.inner.delete(key)
        if fault == "partial":
            raise self._fail("delete (landed)", key)


def serve_with_faults() -> None:
    """``python tests/support/faulty.py STORE PORT``: a graft server whose store injects faults.

    The plan comes from ``GRAFT_TEST_FAULTS`` (FaultPlan JSON), the on/off switch from
    the file named by ``GRAFT_TEST_FAULTS_CONTROL``. When the server stops (SIGTERM or
    SIGINT, not SIGKILL), the faults it injected (``FaultyStore.injected``, as JSON) go
    to the file named by ``GRAFT_TEST_FAULTS_COUNTS``, if set.
    """
    import sys

    from graft_server.objstore import open_store
    from graft_server.serve import serve

    store_spec, port = sys.argv[1], int(sys.argv[2])
    endpoint = os.environ.get("GRAFT_S3_ENDPOINT")
    plan = FaultPlan.from_json(os.environ["GRAFT_TEST_FAULTS"])
    control = os.environ.get("GRAFT_TEST_FAULTS_CONTROL")
    counts = os.environ.get("GRAFT_TEST_FAULTS_COUNTS")
    store = FaultyStore(open_store(store_spec, endpoint), plan, control)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn shuts down on SIGTERM, then raises the signal again for the handler it
    # found: this one, so that the counts below are written before the process ends.
    signal.signal(signal.SIGTERM, stop)
    try:
        serve(store_spec, port=port, store=store)
    finally:
        if counts:
            with store._lock:
                text = json.dumps(store.injected)
            with open(counts + ".tmp", "w") as f:
                f.write(text)
            os.replace(counts + ".tmp", counts)


if __name__ == "__main__":
    serve_with_faults()
