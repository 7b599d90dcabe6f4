"""The cold-read workloads and the systems that run them.

A *system* opens the database cold (nothing local) and runs one workload on it:

- ``graft``: a fresh graft client (empty cache directory) through the link proxy;
- ``s3vfs``: sqlite-s3vfs (PyPI) on the same S3 server, through the same link;
- ``download``: download the whole file from the same S3 server, then native SQLite;
- ``native``: native SQLite on a local file (the file is in the OS page cache).

Each run reports its wall time (``time.perf_counter``), the time to its first row,
and what crossed the link: requests, bytes down and up (counted by the proxy), and
4 KiB pages moved. A graft run also reports where its time went, each figure taken from
outside the product: the CPU time of this process (the client; ``time.process_time``),
of the graft server process and of SeaweedFS (``/proc/PID/stat``), the server's
object-store requests and the wall time they were in flight (the "store" proxy), and
the time the simulated link held its requests and bytes (the "graft" proxy).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import apsw
import sqlite_s3vfs

import graft_vfs
from benchmarks.data import order_ref
from benchmarks.services import (
    BUCKET,
    FULL_KEY,
    S3VFS_PREFIX,
    VOLUME,
    Services,
    s3_bucket,
    s3_client,
)

PAGE = 4096
LOOKUP_SQL = "SELECT id, customer_id, created, amount, note FROM orders WHERE id = ?"
KEY_LOOKUP_SQL = "SELECT id, customer_id, created, amount, note FROM orders WHERE ref = ?"
INDEX20_SQL = "SELECT id, created, amount FROM orders WHERE customer_id = ? ORDER BY id"
SCAN_SQL = "SELECT count(*), sum(c00), sum(length(c02)) FROM wide WHERE id BETWEEN ? AND ?"
AGGREGATE_SQL = "SELECT count(*), round(sum(amount), 2), max(length(note)) FROM orders"


@dataclass
class Workload:
    """One cold-read task. ``kind`` is "lookups", "scan" or "aggregate"."""

    kind: str
    title: str
    sql: str
    params: list[tuple] = field(default_factory=list)

    def run(
        self,
        con: apsw.Connection,
        *,
        deadline: float | None = None,
        on_first: Callable[[], None] | None = None,
    ) -> tuple[str, int]:
        """Run the statements (stopping early at ``deadline``); (digest of rows, count run)."""
        digest = hashlib.sha1()
        done = 0
        for params in self.params:
            rows = con.execute(self.sql, params).fetchall()
            digest.update(repr(rows).encode())
            done += 1
            if done == 1 and on_first is not None:
                on_first()
            if deadline is not None and done >= 3 and time.perf_counter() > deadline:
                break
        return digest.hexdigest()[:16], done


# The workloads every system runs; the others are run by graft and native SQLite only
# (sqlite-s3vfs would add minutes to a run and is far behind on the first three).
BASELINE_KINDS = ("lookups", "scan", "aggregate")
SCAN_SPAN = 2000


def workloads(orders: int, wide_rows: int, *, lookups: int = 100, seed: int = 42) -> list[Workload]:
    rng = random.Random(seed)
    ids = [rng.randint(1, orders) for _ in range(lookups)]
    start = rng.randint(1, max(1, wide_rows - SCAN_SPAN))
    customer = rng.randint(1, max(orders // 20, 1))
    return [
        Workload(
            "lookups",
            f"{lookups} random lookups by primary key (orders)",
            LOOKUP_SQL,
            [(i,) for i in ids],
        ),
        Workload(
            "scan",
            f"range scan of {SCAN_SPAN} rows (wide, ~2 KB rows)",
            SCAN_SQL,
            [(start, start + SCAN_SPAN - 1)],
        ),
        Workload("aggregate", "full-table aggregate (orders)", AGGREGATE_SQL, [()]),
        # The same orders as "lookups", found through the unique index on orders.ref:
        # the same rows, so the same digest.
        Workload(
            "keylookups",
            f"{lookups} random lookups by an indexed non-rowid key (orders.ref)",
            KEY_LOOKUP_SQL,
            [(order_ref(i),) for i in ids],
        ),
        Workload(
            "index20",
            "index query returning ~20 rows scattered over orders (orders_customer)",
            INDEX20_SQL,
            [(customer,)],
        ),
    ]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0.0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command's ")": state is field 3, utime 14 and stime 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One cold run of one workload on one system."""

    seconds: float
    first_row_seconds: float
    requests: int
    bytes_down: int
    bytes_up: int
    pages: int
    digest: str
    done: int  # statements run (fewer than asked when a time budget cut it short)
    total: int
    first: dict | None = None  # counters after the first statement (for extrapolation)
    store_requests: int = 0  # graft: the server's object-store requests
    store_bytes_down: int = 0
    breakdown: dict | None = None  # graft: where the time went (see the module's doc)
    round_trips: int = 0  # periods with requests in flight on the link (parallel ones: 1)

    def extrapolated(self) -> Run:
        """A run cut short, scaled to all its statements: the first as measured, the
        rest at the mean rate of the others."""
        if self.done >= self.total or self.first is None or self.done < 2:
            return self
        k = (self.total - 1) / (self.done - 1)

        def scale(total: float, first: float) -> float:
            return first + (total - first) * k

        f = self.first
        return Run(
            seconds=scale(self.seconds, f["seconds"]),
            first_row_seconds=self.first_row_seconds,
            requests=round(scale(self.requests, f["requests"])),
            bytes_down=round(scale(self.bytes_down, f["bytes_down"])),
            bytes_up=round(scale(self.bytes_up, f["bytes_up"])),
            pages=round(scale(self.pages, f["pages"])),
            digest="",
            done=self.done,
            total=self.total,
        )


class System:
    name = ""
    label = ""
    proxy: str | None = None  # the link proxy its traffic crosses

    def __init__(self, services: Services, db_path: str) -> None:
        self.services = services
        self.db_path = db_path

    def run(self, workload: Workload, *, budget: float | None = None) -> Run:
        """A cold run; with ``budget`` (seconds), stop after it and mark the run short."""
        svc = self.services
        # graft: its link (and S3 through the baselines' link, should a client read the
        # store directly), and the server's store traffic
        names = ["graft", "s3", "store"] if self.proxy == "graft" else [self.proxy]
        names = [n for n in names if n]
        self.prepare()
        svc.reset(*names)
        first: dict = {}
        cpu = self._cpu()
        started = time.perf_counter()
        deadline = started + budget if budget is not None else None

        def on_first() -> None:
            first["seconds"] = time.perf_counter() - started
            if budget is not None and self.proxy:  # a mid-run snapshot, only when needed
                s = svc.stats(self.proxy)
                first.update(
                    requests=s["requests"],
                    bytes_down=s["bytes_down"],
                    bytes_up=s["bytes_up"],
                    pages=self.pages_moved(),
                )

        con = self.open()
        try:
            digest, done = workload.run(con, deadline=deadline, on_first=on_first)
            seconds = time.perf_counter() - started
            cpu_after = self._cpu()
            pages = self.pages_moved(con)
        finally:
            self.close(con)
        link = svc.stats(self.proxy) if self.proxy else {}
        store = svc.stats("store") if self.proxy == "graft" else {}
        breakdown = None
        if self.proxy == "graft":
            direct = svc.stats("s3")
            breakdown = {
                "seconds": seconds,
                "client_cpu": cpu_after[0] - cpu[0],
                "server_cpu": cpu_after[1] - cpu[1],
                "store_cpu": cpu_after[2] - cpu[2],
                "store_requests": store["requests"],
                "store_bytes_down": store["bytes_down"],
                "store_wall": store["busy_wall_seconds"],
                "link_requests_wall": link["busy_wall_seconds"],
                "link_delay": link["delay_seconds"],
                "link_pacing": link["pacing_seconds"],
                "direct_requests": direct["requests"],
                "direct_bytes_down": direct["bytes_down"],
                "direct_wall": direct["busy_wall_seconds"],
            }
            link = {k: link[k] + direct[k] for k in ("requests", "bytes_down", "bytes_up")} | {
                "busy_periods": link["busy_periods"] + direct["busy_periods"]
            }
        return Run(
            seconds=seconds,
            first_row_seconds=first["seconds"],
            requests=link.get("requests", 0),
            bytes_down=link.get("bytes_down", 0),
            bytes_up=link.get("bytes_up", 0),
            pages=pages,
            digest=digest,
            done=done,
            total=len(workload.params),
            first=first if "requests" in first else None,
            store_requests=store.get("requests", 0),
            store_bytes_down=store.get("bytes_down", 0),
            breakdown=breakdown,
            round_trips=link.get("busy_periods", 0),
        )

    def _cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far of this process, the graft server and SeaweedFS."""
        svc = self.services
        return (time.process_time(), cpu_seconds(svc.server_pid), cpu_seconds(svc.store_pid))

    def prepare(self) -> None:
        """Untimed work before a run (creating clients)."""

    def open(self) -> apsw.Connection:
        raise NotImplementedError

    def close(self, con: apsw.Connection) -> None:
        con.close()

    def pages_moved(self, con: apsw.Connection | None = None) -> int:
        return 0


class Native(System):
    name = "native"
    label = "native SQLite, local file"

    def open(self) -> apsw.Connection:
        return apsw.Connection(self.db_path, flags=apsw.SQLITE_OPEN_READONLY)


class Graft(System):
    name = "graft"
    label = "graft (this project), cold client"
    proxy = "graft"

    def __init__(self, services: Services, db_path: str) -> None:
        super().__init__(services, db_path)
        self.cache: str | None = None

    def prepare(self) -> None:
        self.cache = tempfile.mkdtemp(prefix="cold-", dir=self.services.work)

    def open(self) -> apsw.Connection:
        return graft_vfs.connect(
            VOLUME, remote=self.services.url("graft"), cache_dir=self.cache, readonly=True
        )

    def pages_moved(self, con: apsw.Connection | None = None) -> int:
        if con is None:
            return 0
        stats = json.loads(con.execute("PRAGMA graft_stats").fetchone()[0])
        return int(stats["pages_fetched"])

    def close(self, con: apsw.Connection) -> None:
        name = con.open_vfs
        con.close()
        graft_vfs.unregister(name)
        if self.cache:
            shutil.rmtree(self.cache, ignore_errors=True)


class FullDownload(System):
    name = "download"
    label = "download whole file from S3, then native"
    proxy = "s3"

    def prepare(self) -> None:
        self.client = s3_client(self.services.url("s3"))
        self.local = os.path.join(tempfile.mkdtemp(dir=self.services.work), "copy.db")
        self.fetched = 0

    def open(self) -> apsw.Connection:
        body = self.client.get_object(Bucket=BUCKET, Key=FULL_KEY)["Body"]
        with open(self.local, "wb") as f:
            for chunk in body.iter_chunks(1 << 20):
                f.write(chunk)
                self.fetched += len(chunk)
        return apsw.Connection(self.local, flags=apsw.SQLITE_OPEN_READONLY)

    def pages_moved(self, con: apsw.Connection | None = None) -> int:
        return self.fetched // PAGE

    def close(self, con: apsw.Connection) -> None:
        con.close()
        shutil.rmtree(os.path.dirname(self.local), ignore_errors=True)
        self.client.close()


class S3VFS(System):
    name = "s3vfs"
    label = "sqlite-s3vfs (PyPI) on the same S3"
    proxy = "s3"
    block_size = 65536

    def prepare(self) -> None:
        self.bucket = s3_bucket(self.services.url("s3"))
        self.block_bytes = 0
        events = self.bucket.meta.client.meta.events

        def count(http_response, parsed, **kwargs) -> None:
            if http_response.status_code < 300:
                self.block_bytes += int(parsed.get("ContentLength") or 0)

        events.register("after-call.s3.GetObject", count)
        self.vfs = sqlite_s3vfs.S3VFS(bucket=self.bucket, block_size=self.block_size)

    def open(self) -> apsw.Connection:
        return apsw.Connection(S3VFS_PREFIX, vfs=self.vfs.name, flags=apsw.SQLITE_OPEN_READONLY)

    def pages_moved(self, con: apsw.Connection | None = None) -> int:
        return self.block_bytes // PAGE

    def close(self, con: apsw.Connection) -> None:
        con.close()
        self.vfs.unregister()
        self.bucket.meta.client.close()
