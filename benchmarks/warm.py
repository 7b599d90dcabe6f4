"""The warm path (issue 11, target 4): ``python -m benchmarks.warm [--quick]``.

Every page of the volume is local (hydrated), so no request crosses the link: what is
measured is the cost of the VFS itself. The same generated database runs in one
process on three systems:

- ``native``: SQLite's own unix VFS on a file;
- ``pass``: a pass-through Python VFS (``apsw.VFS`` / ``apsw.VFSFile`` inheriting the
  default VFS) on a copy of that file: the floor any Python VFS pays per call;
- ``graft``: the volume through the ``graft`` VFS, from a real server on loopback
  (directory store), hydrated first; ``graft-small`` is the same client with a 1 MB
  memory cache, so its reads come from the local store on disk.

Rows: random point lookups (SQLite's default page cache, 2 MB: each lookup reads its
leaf through the VFS), a full scan of ``orders`` with ``cache_size=-2000``, and
write-heavy SQL with ``cache_size=-2000`` (a bulk insert, an index build, updates,
deletes, VACUUM); then the reads again after N small commits, each pushed. Each row
runs its systems interleaved, ``rounds`` times, and keeps the median; every round
checks that all systems returned the same rows. ``run()`` returns a dict a harness can
store; the ratios are ``speed_vs_native`` (native time / graft time, >= 1.0 is as fast
as native, as the README's warm ratio) and ``time_vs_pass`` (graft time / pass-through
time; the target is <= 1.3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import apsw

import graft_vfs
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.remote import Remote
from graft_vfs.sample import make_sample_database
from tests.support.servers import running_server

VOLUME = "warm"
SMALL_CACHE_PAGES = 256  # graft-small's memory cache: 1 MB
LOOKUP_SQL = "SELECT id, customer_id, created, amount, note FROM orders WHERE id = ?"
SCAN_SQL = "SELECT count(*), round(sum(amount), 2), max(length(note)) FROM orders"
INSERT_SQL = "INSERT INTO orders(customer_id, created, amount, note) VALUES(?,?,?,?)"


@dataclass(frozen=True)
class Config:
    orders: int  # rows of the sample database (about 130 bytes each)
    lookups: int
    rounds: int
    write_rows: int  # rows of the write-heavy SQL's bulk insert
    commits: int  # small commits (each pushed) before the "after" rows

    @staticmethod
    def of(quick: bool) -> Config:
        if quick:
            return Config(orders=60_000, lookups=3_000, rounds=3, write_rows=10_000, commits=40)
        return Config(orders=300_000, lookups=20_000, rounds=5, write_rows=50_000, commits=200)


class PassFile(apsw.VFSFile):
    """A file of the default VFS, every call made from Python."""

    def __init__(self, name: str | apsw.URIFilename | None, flags: list[int]) -> None:
        super().__init__("", name, flags)


class PassVFS(apsw.VFS):
    """The pass-through VFS: the default VFS with every call crossing into Python."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "")

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> PassFile:
        return PassFile(name, flags)


def _digest(rows: object) -> str:
    return hashlib.sha1(repr(rows).encode()).hexdigest()[:16]


def _timed(fn: Callable[[], object]) -> tuple[float, str]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, _digest(out)


def _lookups(ids: list[int]) -> Callable[[apsw.Connection], Callable[[], object]]:
    def make(con: apsw.Connection) -> Callable[[], object]:
        def run() -> object:
            return [con.execute(LOOKUP_SQL, (i,)).fetchall() for i in ids]

        return run

    return make


def _scan(con: apsw.Connection) -> Callable[[], object]:
    return lambda: con.execute(SCAN_SQL).fetchall()


def _writes(rows: list[tuple]) -> Callable[[apsw.Connection], Callable[[], object]]:
    """Write-heavy SQL, repeatable on its own result: every round starts from the same state."""

    def make(con: apsw.Connection) -> Callable[[], object]:
        def run() -> object:
            con.execute("DROP TABLE IF EXISTS w")
            con.execute("CREATE TABLE w(id INTEGER PRIMARY KEY, k INTEGER, v TEXT)")
            with con:
                con.executemany("INSERT INTO w(id, k, v) VALUES(?,?,?)", rows)
            con.execute("CREATE INDEX w_k ON w(k)")
            con.execute("CREATE INDEX w_v ON w(v)")
            con.execute("UPDATE w SET v = v || 'x', k = k + 1 WHERE id % 3 = 0")
            con.execute("DELETE FROM w WHERE id % 4 = 0")
            con.execute("UPDATE orders SET amount = round(amount * 1.01, 2) WHERE id % 50 = 0")
            con.execute("VACUUM")
            return con.execute(
                "SELECT count(*), sum(k), max(v), (SELECT round(sum(amount), 2) FROM orders) FROM w"
            ).fetchall()

        return run

    return make


class Systems:
    """The three (four) systems on one database, and their connections."""

    def __init__(self, cfg: Config, work: str, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.work = work
        self.log = log
        self.path = os.path.join(work, "warm.db")
        t = time.perf_counter()
        make_sample_database(self.path, orders=cfg.orders)
        self.generated = time.perf_counter() - t
        self.pass_path = os.path.join(work, "pass.db")
        shutil.copyfile(self.path, self.pass_path)
        self.bytes = os.path.getsize(self.path)
        self.pass_vfs = PassVFS("warm-pass")
        self.cons: dict[str, apsw.Connection] = {}
        self.writers: dict[str, apsw.Connection] = {}

    def open(self, url: str) -> None:
        remote = Remote(url)
        try:
            import_database(remote, self.path, VOLUME)
        finally:
            remote.close()
        cache = os.path.join(self.work, "cache")
        opts = graft_vfs.Options(autopush=False)
        graft_vfs.register(url, cache, name="graft-warm", options=opts)
        small = graft_vfs.Options(autopush=False, cache_pages=SMALL_CACHE_PAGES)
        graft_vfs.register(url, cache, name="graft-warm-small", options=small)
        ro = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY
        rw = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE
        self.cons["native"] = apsw.Connection(self.path, flags=ro)
        self.cons["pass"] = apsw.Connection(self.pass_path, flags=ro, vfs="warm-pass")
        self.cons["graft"] = apsw.Connection(f"file:{VOLUME}", flags=ro, vfs="graft-warm")
        self.cons["graft-small"] = apsw.Connection(
            f"file:{VOLUME}", flags=ro, vfs="graft-warm-small"
        )
        t = time.perf_counter()
        hydrated = json.loads(self.cons["graft"].execute("PRAGMA graft_hydrate").fetchone()[0])
        self.log(f"  hydrated {hydrated['pages_fetched']} pages in {time.perf_counter() - t:.2f} s")
        self.writers["native"] = apsw.Connection(self.path, flags=rw)
        self.writers["pass"] = apsw.Connection(self.pass_path, flags=rw, vfs="warm-pass")
        self.writers["graft"] = apsw.Connection(f"file:{VOLUME}", flags=rw, vfs="graft-warm")
        self.writers["graft"].execute("PRAGMA journal_mode=MEMORY").fetchall()
        for con in (*self.cons.values(), *self.writers.values()):
            con.execute("PRAGMA cache_size=-2000")  # SQLite's default, said out loud

    def close(self) -> None:
        for con in (*self.cons.values(), *self.writers.values()):
            con.close()
        self.cons.clear()
        self.writers.clear()
        for name in ("graft-warm", "graft-warm-small"):
            graft_vfs.unregister(name)
        self.pass_vfs.unregister()

    def commits(self, n: int) -> float:
        """``n`` single-row commits on every system; graft pushes each one. Graft's time."""
        rng = random.Random(9)
        rows = [
            (
                rng.randint(1, max(self.cfg.orders // 20, 1)),
                "2026-01-01",
                round(rng.uniform(1, 500), 2),
                "".join(rng.choices("abcdefghij ", k=60)),
            )
            for _ in range(n)
        ]
        spent = 0.0
        for name, con in self.writers.items():
            t = time.perf_counter()
            for row in rows:
                con.execute(INSERT_SQL, row)
                if name == "graft":
                    con.execute("PRAGMA graft_push").fetchall()
            if name == "graft":
                spent = time.perf_counter() - t
        return spent


def measure(
    systems: dict[str, apsw.Connection],
    make: Callable[[apsw.Connection], Callable[[], object]],
    rounds: int,
    title: str,
) -> dict:
    """Run one workload on every system, interleaved; medians, ratios, rows checked."""
    runs = {name: make(con) for name, con in systems.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # one round each to warm every cache
        run()
    for _ in range(rounds):
        digests = {}
        for name, run in runs.items():
            seconds, digests[name] = _timed(run)
            times[name].append(seconds)
        if len(set(digests.values())) != 1:
            raise AssertionError(f"{title}: the systems returned different rows: {digests}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    out: dict = {"title": title, "seconds": med, "runs": times}
    for name in med:
        if name.startswith("graft"):
            out[f"{name}_speed_vs_native"] = med["native"] / med[name]
            out[f"{name}_time_vs_pass"] = med[name] / med["pass"]
    return out


def run(quick: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The whole benchmark; returns its results (also printed by ``main``)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = Config.of(quick)
    work = tempfile.mkdtemp(prefix="graft-warm-")
    rng = random.Random(5)
    ids = [rng.randint(1, cfg.orders) for _ in range(cfg.lookups)]
    write_rows = [
        (i, rng.randint(0, 1000), "".join(rng.choices("abcdefghij", k=40)))
        for i in range(1, cfg.write_rows + 1)
    ]
    rows: list[dict] = []
    try:
        systems = Systems(cfg, work, log)
        log(f"  database: {systems.bytes / 1e6:.1f} MB, {cfg.orders} orders")
        store = os.path.join(work, "store")
        with running_server(store) as (_, url):
            systems.open(url)
            try:
                readers = systems.cons
                log("  lookups, fresh volume")
                rows.append(measure(readers, _lookups(ids), cfg.rounds, "lookups, fresh"))
                log("  full scan, fresh volume")
                rows.append(measure(readers, _scan, cfg.rounds, "full scan, fresh"))
                log("  write-heavy SQL")
                rows.append(measure(systems.writers, _writes(write_rows), cfg.rounds, "writes"))
                log(f"  {cfg.commits} small commits, each pushed")
                commit_seconds = systems.commits(cfg.commits)
                after = f"after {cfg.commits} commits"
                log(f"  lookups, {after}")
                rows.append(measure(readers, _lookups(ids), cfg.rounds, f"lookups, {after}"))
                log(f"  full scan, {after}")
                rows.append(measure(readers, _scan, cfg.rounds, f"full scan, {after}"))
            finally:
                systems.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "config": asdict(cfg),
        "database_bytes": systems.bytes,
        "commits_seconds": commit_seconds,
        "rows": rows,
    }


def store_costs(pages: int = 2000, reps: int = 9) -> dict[str, float]:
    """Microseconds per page of the local store's own operations, best of ``reps``.

    A store of ``pages`` random 4 KiB pages, all copied back into its file: a point read
    (``read_page``, verified), the same query's SQL alone with and without the data
    column (empty for a page in the page file), a page of a 128-page run (``read_run``),
    a page of a durable commit of 300 scattered pages (``commit``, synced), a page of
    128 fetched pages stored (``store_fetched``, not synced), and the floor of a read
    from the page file: ``pread`` of 4 KiB and its CRC.
    """
    import zlib

    from graft_vfs.client.local import LocalStore

    work = tempfile.mkdtemp(prefix="graft-store-costs-")
    rng = random.Random(1)
    data = [rng.randbytes(4096) for _ in range(pages)]
    ids = [rng.randrange(pages) for _ in range(5000)]
    store = LocalStore(work)
    out: dict[str, float] = {}

    def best(name: str, fn: Callable[[], object], per: int) -> None:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = min(times) / per * 1e6

    try:
        v = store.create_volume("costs", 0, 0).row_id
        lsn = store.commit(v, 0, dict(enumerate(data)), pages)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        sql = "FROM pages WHERE v=? AND pageno=? AND lsn<=? ORDER BY lsn DESC LIMIT 1"
        best("read_page", lambda: [store.read_page(v, p, lsn) for p in ids], len(ids))
        for name, cols in (("sql, key only", "lsn, crc"), ("sql, with data", "lsn, data, crc")):
            query = f"SELECT {cols} {sql}"

            def lookups(query: str = query) -> object:
                return [store._db.execute(query, (v, p, lsn)).fetchone() for p in ids]

            best(name, lookups, len(ids))
        runs = range(0, pages - 128, 128)
        best(
            "read_run, a page of 128",
            lambda: [store.read_run(v, f, 128, lsn) for f in runs],
            len(runs) * 128,
        )

        def commits() -> None:
            nonlocal lsn
            for _ in range(3):
                lsn = store.commit(
                    v, lsn, {p: data[p] for p in rng.sample(range(pages), 300)}, pages
                )

        best("commit, a page of 300 scattered", commits, 900)
        fetch_pages = min(pages, 1024) // 128 * 128
        fetched = iter([store.create_volume(f"fetched{i}", 5, pages).row_id for i in range(reps)])

        def fetches() -> None:
            into = next(fetched)
            for first in range(0, fetch_pages, 128):
                store.store_fetched(into, [(p, 1, data[p]) for p in range(first, first + 128)])

        best("store_fetched, a page of 128", fetches, fetch_pages)
        with open(os.path.join(work, "graft-cache.pages"), "rb") as f:
            fd = f.fileno()
            best(
                "pread 4 KiB + crc32",
                lambda: [zlib.crc32(os.pread(fd, 4096, 4096 * (p % 64))) for p in ids],
                len(ids),
            )
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


def table(result: dict) -> str:
    """The results as a text table: medians in ms and the two ratios."""
    systems = ("native", "pass", "graft", "graft-small")
    head = f"{'workload':<28}" + "".join(f"{s:>13}" for s in systems)
    head += f"{'graft/native':>14}{'graft/pass':>12}{'small/pass':>12}"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        sec = row["seconds"]
        line = f"{row['title']:<28}"
        line += "".join(f"{sec[s] * 1000:>10.1f} ms" if s in sec else f"{'-':>13}" for s in systems)
        line += f"{row['graft_speed_vs_native']:>13.2f}x"
        line += f"{row['graft_time_vs_pass']:>11.2f}x"
        small = row.get("graft-small_time_vs_pass")
        line += f"{small:>11.2f}x" if small is not None else f"{'-':>12}"
        lines.append(line)
    lines.append(
        "graft/native: native time / graft time (>= 1.0: as fast as native); "
        "graft/pass, small/pass: time / pass-through VFS time (target <= 1.3)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller database, fewer rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--store", action="store_true", help="only the local store's costs per page (store_costs)"
    )
    args = parser.parse_args(argv)
    if args.store:
        for name, us in store_costs().items():
            print(f"{name:<34}{us:>8.1f} us")
        return 0
    result = run(args.quick)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
