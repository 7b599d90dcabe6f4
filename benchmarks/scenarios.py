"""The scenarios of issue 4: cold reads per link, warm reads, writes, sync catch-up.

Each returns a JSON-ready dict. Graft is always measured. A baseline run that would
take longer than the run's ``budget`` is either cut short and extrapolated (a run of
many lookups: the first as measured, the rest at the mean rate of the others) or,
for one long statement on a slow link, computed from its loopback run with the
link model (``seconds + requests x delay + bytes / bandwidth``); either way the
result says so in ``how``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

import apsw
import sqlite_s3vfs
import zstandard

import graft_vfs
from benchmarks.data import Dataset
from benchmarks.linkproxy import LOOPBACK, PROFILES, Link
from benchmarks.services import VOLUME, Services, s3_bucket
from benchmarks.systems import (
    BASELINE_KINDS,
    LOOKUP_SQL,
    PAGE,
    S3VFS,
    FullDownload,
    Graft,
    Native,
    Run,
    Workload,
)
from graft_vfs.client.remote import Remote
from graft_vfs.core.segment import ZSTD_LEVEL
from graft_vfs.sample import SCHEMA


@dataclass
class Config:
    quick: bool
    reps: dict[str, int]  # cold runs per workload kind
    download_reps: int
    budget: float  # seconds a baseline run may take before it is extrapolated or modelled
    baseline_reps: int  # sqlite-s3vfs runs per workload and link (it is by far the slowest)
    warm_lookups: int
    warm_rounds: int
    history_commits: int
    single_commits: int
    bulk_rows: int
    server_cold_reps: int = 1  # runs with the server restarted before each, per workload
    prefetch_reps: int = 1  # PRAGMA graft_prefetch and graft_hydrate runs per link
    breakdown_reps: int = 3  # one cold lookup, server cold and warm, per link
    fragment_commits: int = 200  # small commits before the fragmented-history runs
    fragment_reps: int = 1
    s3vfs: bool = True  # run sqlite-s3vfs (the slowest baseline) at all
    profiles: tuple[str, ...] = ("loopback", "edge", "slow")

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(
                quick=True,
                reps={"lookups": 3, "scan": 3, "aggregate": 1, "keylookups": 1, "index20": 3},
                download_reps=1,
                budget=10.0,
                baseline_reps=1,
                breakdown_reps=2,
                warm_lookups=20_000,
                warm_rounds=7,
                history_commits=200,
                single_commits=200,
                bulk_rows=50_000,
            )
        return cls(
            quick=False,
            reps={"lookups": 7, "scan": 5, "aggregate": 3, "keylookups": 7, "index20": 5},
            download_reps=3,
            budget=900.0,
            baseline_reps=3,
            warm_lookups=20_000,
            warm_rounds=9,
            history_commits=200,
            single_commits=500,
            bulk_rows=100_000,
            server_cold_reps=3,
            prefetch_reps=3,
            breakdown_reps=5,
            fragment_reps=3,
        )


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarize(runs: list[Run], how: str = "measured") -> dict:
    """Medians of repeated runs (and every run's seconds, and the rows' digest)."""
    return {
        "digest": _digest_of(runs),
        "seconds": median([r.seconds for r in runs]),
        "first_row_seconds": median([r.first_row_seconds for r in runs]),
        "requests": round(median([r.requests for r in runs])),
        "bytes_down": round(median([r.bytes_down for r in runs])),
        "bytes_up": round(median([r.bytes_up for r in runs])),
        "pages": round(median([r.pages for r in runs])),
        "store_requests": round(median([r.store_requests for r in runs])),
        "round_trips": round(median([r.round_trips for r in runs])),
        "runs": [round(r.seconds, 4) for r in runs],
        "how": how,
        **({"breakdown": _breakdown(runs)} if any(r.breakdown for r in runs) else {}),
    }


def _breakdown(runs: list[Run]) -> dict:
    """The median of each breakdown figure over ``runs``."""
    got = [r.breakdown for r in runs if r.breakdown]
    return {k: median([b[k] for b in got]) for k in got[0]}


def modelled(loopback: dict, link: Link) -> dict:
    """A run on ``link`` computed from the same run on loopback: each request waits
    the link's delay (a new connection once more), bytes are paced at its bandwidth."""
    seconds = loopback["seconds"] + (loopback["requests"] + 1) * link.delay
    if link.bandwidth:
        seconds += (loopback["bytes_down"] + loopback["bytes_up"]) / link.bandwidth
    first = loopback["first_row_seconds"] + 2 * link.delay
    if loopback["seconds"] - loopback["first_row_seconds"] < 0.01 * loopback["seconds"]:
        first = seconds  # one statement (or one download first): its rows come at the end
    return {
        **loopback,
        "seconds": seconds,
        "first_row_seconds": first,
        "runs": [],
        "digest": None,
        "how": "modelled from the loopback run (link too slow for this run's budget)",
    }


def predicted_seconds(loopback: dict | None, link: Link) -> float:
    return 0.0 if loopback is None else modelled(loopback, link)["seconds"]


# -- cold reads -------------------------------------------------------------------------


SERVER_COLD_KINDS = ("lookups", "keylookups")


def cold(svc: Services, ds: Dataset, s3vfs_db: str, wls: list[Workload], cfg: Config, log) -> dict:
    """Per link: every workload on a fresh client with the server warm (it has served every
    page since its start, as a long-running one would); the lookups also with the server
    restarted before each run (its caches empty: every page comes from S3); one cold
    lookup broken down by where its time went, server warm and cold; the baselines."""
    out: dict = {}
    first_id = [(i,) for (i,) in next(w for w in wls if w.kind == "lookups").params[:1]]
    one = Workload("single", "one cold lookup", LOOKUP_SQL, first_id)
    for name in cfg.profiles:
        link = PROFILES[name]
        svc.set_link(link)
        loop = out.get("loopback")  # None while on loopback itself
        res: dict = {w.kind: {} for w in wls}
        out[name] = res

        for w in wls:
            native = Native(svc, ds.path)
            res[w.kind]["native"] = summarize([native.run(w) for _ in range(cfg.reps[w.kind])])

        for w in wls:
            if w.kind not in SERVER_COLD_KINDS:
                continue
            runs = []
            for _ in range(cfg.server_cold_reps):
                svc.restart_server()
                runs.append(Graft(svc, ds.path).run(w))
            res[w.kind]["graft_server_cold"] = summarize(runs)
            log(
                f"  {name}: graft {w.kind}, server cold on S3: "
                f"{res[w.kind]['graft_server_cold']['seconds']:.3f} s, "
                f"{res[w.kind]['graft_server_cold']['store_requests']} store requests"
            )
        cold_one = []
        for _ in range(cfg.breakdown_reps):
            svc.restart_server()
            cold_one.append(Graft(svc, ds.path).run(one))

        took = svc.warm_server()
        log(f"  {name}: server warmed (every page read once) in {took:.1f} s")
        for w in wls:
            runs = [Graft(svc, ds.path).run(w) for _ in range(cfg.reps[w.kind])]
            res[w.kind]["graft"] = summarize(runs)
            log(f"  {name}: graft {w.kind}: {res[w.kind]['graft']['seconds']:.3f} s")
        res["single"] = {
            "native": summarize([Native(svc, ds.path).run(one)]),
            "graft": summarize([Graft(svc, ds.path).run(one) for _ in range(cfg.breakdown_reps)]),
            "graft_server_cold": summarize(cold_one),
        }
        res["single"]["results_agree"] = agree(res["single"])
        b = res["single"]["graft_server_cold"]["breakdown"]
        log(
            f"  {name}: one cold lookup, server cold: {b['seconds'] * 1000:.1f} ms = client CPU "
            f"{b['client_cpu'] * 1000:.1f} ms, server CPU {b['server_cpu'] * 1000:.1f} ms, "
            f"store {b['store_requests']} requests in {b['store_wall'] * 1000:.1f} ms, link "
            f"{(b['link_delay'] + b['link_pacing']) * 1000:.1f} ms"
        )

        dl = _download(svc, ds, wls, cfg, link, loop)
        for kind, summary in dl.items():
            res[kind]["download"] = summary
        first_dl = dl[wls[0].kind]
        log(f"  {name}: full download: {first_dl['seconds']:.3f} s ({first_dl['how']})")

        for w in wls:
            if w.kind not in BASELINE_KINDS or not cfg.s3vfs:
                continue
            res[w.kind]["s3vfs"] = _s3vfs(svc, s3vfs_db, w, cfg, link, loop)
            log(
                f"  {name}: sqlite-s3vfs {w.kind}: {res[w.kind]['s3vfs']['seconds']:.2f} s "
                f"({res[w.kind]['s3vfs']['how']})"
            )

        for w in wls:
            res[w.kind]["results_agree"] = agree(res[w.kind])
        if "keylookups" in res and "lookups" in res:  # the same orders, by another key
            digests = {_get_digest(res["lookups"]), _get_digest(res["keylookups"])}
            res["keylookups"]["same_rows_as_rowid_lookups"] = len(digests) == 1
    return out


def agree(per_system: dict) -> bool:
    """Every system that ran all of a workload returned the same rows (and one did)."""
    digests = {v["digest"] for v in per_system.values() if isinstance(v, dict) and v.get("digest")}
    return len(digests) == 1


def _get_digest(per_system: dict) -> str | None:
    return (per_system.get("native") or {}).get("digest")


def _digest_of(runs: list[Run]) -> str | None:
    complete = {r.digest for r in runs if r.done == r.total and r.digest}
    return complete.pop() if len(complete) == 1 else None


def _download(
    svc: Services, ds: Dataset, wls: list[Workload], cfg: Config, link: Link, loop: dict | None
) -> dict[str, dict]:
    """The whole file from S3 once per repetition, then each workload on the copy."""
    if loop is not None:
        base = loop[wls[0].kind]["download"]
        if predicted_seconds(base, link) > cfg.budget:
            return {w.kind: modelled(loop[w.kind]["download"], link) for w in wls}
    per_kind: dict[str, list[Run]] = {w.kind: [] for w in wls}
    for _ in range(cfg.download_reps):
        system = FullDownload(svc, ds.path)
        system.prepare()
        svc.reset("s3")
        started = time.perf_counter()
        con = system.open()
        fetched = time.perf_counter() - started
        stats = svc.stats("s3")
        try:
            for w in wls:
                t = time.perf_counter()
                marks: list[float] = []
                digest, done = w.run(con, on_first=lambda: marks.append(time.perf_counter() - t))
                took = time.perf_counter() - t
                per_kind[w.kind].append(
                    Run(
                        seconds=fetched + took,
                        first_row_seconds=fetched + marks[0],
                        requests=stats["requests"],
                        bytes_down=stats["bytes_down"],
                        bytes_up=stats["bytes_up"],
                        pages=system.pages_moved(),
                        digest=digest,
                        done=done,
                        total=len(w.params),
                    )
                )
        finally:
            system.close(con)
    return {kind: summarize(runs) for kind, runs in per_kind.items()}


def _s3vfs(svc: Services, db: str, w: Workload, cfg: Config, link: Link, loop: dict | None) -> dict:
    if loop is not None:
        base = loop[w.kind]["s3vfs"]
        if cfg.quick:  # bench-quick measures it on loopback only (it is far behind anyway)
            out = modelled(base, link)
            if base["how"] != "measured":
                out["how"] += f"; that run {base['how']}"
            return out
        if w.kind != "lookups" and predicted_seconds(base, link) > cfg.budget:
            return modelled(base, link)
    runs = []
    for _ in range(1 if w.kind == "aggregate" else cfg.baseline_reps):
        run = S3VFS(svc, db).run(w, budget=cfg.budget)
        runs.append(run)
        if run.done < run.total or run.seconds > cfg.budget:
            break  # one run is all the budget allows
    short = [r for r in runs if r.done < r.total]
    if short:
        r = short[0]
        return {
            **summarize([r.extrapolated()]),
            "how": f"extrapolated from the first {r.done} of {r.total} lookups "
            f"(measured {r.seconds:.1f} s)",
        }
    return summarize(runs)


# -- warm reads -------------------------------------------------------------------------


class WarmClient:
    """One graft client that has every page of the volume locally (autopush off, so each
    push is an explicit, separately measured PRAGMA graft_push)."""

    NAME = "graft-bench-warm"

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.cache = tempfile.mkdtemp(prefix="warm-", dir=svc.work)
        graft_vfs.register(
            svc.url("graft"), self.cache, name=self.NAME, options=graft_vfs.Options(autopush=False)
        )
        flags = apsw.SQLITE_OPEN_URI
        self.reader = apsw.Connection(
            f"file:{VOLUME}", flags=flags | apsw.SQLITE_OPEN_READONLY, vfs=self.NAME
        )
        self.writer = apsw.Connection(
            f"file:{VOLUME}", flags=flags | apsw.SQLITE_OPEN_READWRITE, vfs=self.NAME
        )
        self.writer.execute("PRAGMA journal_mode=MEMORY").fetchall()

    def pragma(self, name: str, con: apsw.Connection | None = None) -> dict:
        return json.loads((con or self.writer).execute(f"PRAGMA {name}").fetchone()[0])

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
        graft_vfs.unregister(self.NAME)


def _lookup_rate(con: apsw.Connection, ids: list[int]) -> float:
    started = time.perf_counter()
    for i in ids:
        con.execute(LOOKUP_SQL, (i,)).fetchall()
    return len(ids) / (time.perf_counter() - started)


def _warm_rates(
    native: apsw.Connection, graft: apsw.Connection, ids: list[int], rounds: int
) -> dict:
    _lookup_rate(native, ids)  # one round each to warm SQLite's and graft's caches
    _lookup_rate(graft, ids)
    n, g = [], []
    for _ in range(rounds):  # interleaved, so drift on the machine hits both alike
        n.append(_lookup_rate(native, ids))
        g.append(_lookup_rate(graft, ids))
    return {
        "native_per_s": median(n),
        "graft_per_s": median(g),
        "ratio": median(g) / median(n),
        "native_runs": [round(x) for x in n],
        "graft_runs": [round(x) for x in g],
    }


def warm(svc: Services, ds: Dataset, client: WarmClient, cfg: Config, log) -> dict:
    svc.set_link(LOOPBACK)
    t = time.perf_counter()
    hydrated = client.pragma("graft_hydrate", client.reader)
    hydrate_seconds = time.perf_counter() - t
    rng = random.Random(5)
    ids = [rng.randint(1, ds.spec.orders) for _ in range(cfg.warm_lookups)]
    native = apsw.Connection(ds.path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        fresh = _warm_rates(native, client.reader, ids, cfg.warm_rounds)
        log(f"  warm, fresh volume: {fresh['ratio']:.2f}x native")
        history = history_commits(svc, ds, client, cfg.history_commits)
        log(
            f"  {cfg.history_commits} commits, each pushed: "
            f"{history['commit_and_push_per_s']:.1f}/s"
        )
        after = _warm_rates(native, client.reader, ids, cfg.warm_rounds)
        log(f"  warm, after {cfg.history_commits} commits: {after['ratio']:.2f}x native")
    finally:
        native.close()
    return {
        "lookups": cfg.warm_lookups,
        "rounds": cfg.warm_rounds,
        "hydrate": {**hydrated, "measured_seconds": hydrate_seconds},
        "fresh": fresh,
        "after_history": {**after, "commits": cfg.history_commits},
        "history_pushes": history,
    }


# -- a fragmented history -----------------------------------------------------------------


FRAGMENT_ORDER_SQL = "UPDATE orders SET amount = amount + 1 WHERE id = ?"
FRAGMENT_WIDE_SQL = "UPDATE wide SET c00 = c00 + 1 WHERE id = ?"


def fragment_statements(wls: list[Workload], n: int) -> list[tuple[str, tuple]]:
    """``n`` single-row updates, alternately of one of the orders the lookups read and of
    a row of the scanned range (evenly spread over it): afterwards the pages those
    workloads read come from up to ``n`` small segments instead of one import."""
    ids = [p[0] for p in next(w for w in wls if w.kind == "lookups").params]
    lo, hi = next(w for w in wls if w.kind == "scan").params[0]
    half = max(n // 2, 1)
    out = []
    for k in range(n):
        if k % 2 == 0:
            out.append((FRAGMENT_ORDER_SQL, (ids[(k // 2) % len(ids)],)))
        else:
            out.append((FRAGMENT_WIDE_SQL, (lo + (k // 2) * (hi - lo + 1) // half,)))
    return out


def native_copy(svc: Services, ds: Dataset) -> str:
    """A copy of the database with every statement committed to the volume applied."""
    path = os.path.join(tempfile.mkdtemp(prefix="native-copy-", dir=svc.work), "copy.db")
    shutil.copyfile(ds.path, path)
    con = apsw.Connection(path)
    try:
        with con:
            for sql, params in svc.applied:
                con.execute(sql, params)
    finally:
        con.close()
    return path


def fragmented(
    svc: Services, ds: Dataset, client: WarmClient, wls: list[Workload], cfg: Config, log
) -> dict:
    """Cold lookups and a cold range scan after ``cfg.fragment_commits`` small commits,
    each pushed at once, that changed the pages those workloads read (a fresh client,
    server warm; on loopback also with the server cold, for its store requests)."""
    svc.set_link(LOOPBACK)
    stmts = fragment_statements(wls, cfg.fragment_commits)
    t = time.perf_counter()
    for sql, params in stmts:
        client.writer.execute(sql, params)
        client.pragma("graft_push")
        svc.applied.append((sql, params))
    took = time.perf_counter() - t
    log(f"  {len(stmts)} small commits, each pushed, in {took:.1f} s")
    out: dict = {"commits": len(stmts), "commit_and_push_per_s": len(stmts) / took}
    copy = native_copy(svc, ds)
    kinds = [w for w in wls if w.kind in ("lookups", "scan")]
    try:
        for name in cfg.profiles:
            svc.set_link(PROFILES[name])
            res: dict = {}
            out[name] = res
            if name == "loopback":
                for w in kinds:
                    svc.restart_server()
                    res.setdefault(w.kind, {})["graft_server_cold"] = summarize(
                        [Graft(svc, ds.path).run(w)]
                    )
            svc.warm_server()
            for w in kinds:
                r = res.setdefault(w.kind, {})
                r["native"] = summarize([Native(svc, copy).run(w)])
                r["graft"] = summarize(
                    [Graft(svc, ds.path).run(w) for _ in range(cfg.fragment_reps)]
                )
                r["results_agree"] = agree(r)
                log(
                    f"  {name}: graft {w.kind} after {len(stmts)} commits: "
                    f"{r['graft']['seconds']:.3f} s, {r['graft']['requests']} requests"
                    + ("" if r["results_agree"] else " !! rows differ from native SQLite")
                )
    finally:
        shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
    return out


# -- writes -----------------------------------------------------------------------------


def _order_row(rng: random.Random, customers: int) -> tuple:
    return (
        rng.randint(1, customers),
        f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        round(rng.uniform(1, 500), 2),
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=60)),
    )


INSERT_SQL = "INSERT INTO orders(customer_id, created, amount, note) VALUES(?,?,?,?)"


def changed_pages(remote: Remote, lsn: int) -> tuple[int, int]:
    """(pages changed by remote LSN ``lsn``, their zstd size at the segment codec's level),
    read back from the server through the public client API."""
    _, changed = remote.pull(VOLUME, lsn - 1)
    got = remote.read_pages(VOLUME, lsn, changed)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return len(changed), sum(len(cctx.compress(data)) for _, data in got.values())


def measured_push(svc: Services, client: WarmClient, remote: Remote) -> dict:
    """PRAGMA graft_push, with what it sent and what the server wrote to the store."""
    svc.reset("graft", "store")
    t = time.perf_counter()
    result = client.pragma("graft_push")
    seconds = time.perf_counter() - t
    link, store = svc.stats("graft"), svc.stats("store")
    pages, compressed = changed_pages(remote, result["remote_lsn"])
    writes = store["methods"].get("PUT", 0) + store["methods"].get("POST", 0)
    return {
        "seconds": seconds,
        "local_commits": result.get("local_commits", 0),
        "pages": pages,
        "compressed_bytes": compressed,
        "requests": link["requests"],
        "bytes_up": link["bytes_up"],
        "bytes_down": link["bytes_down"],
        "object_writes": writes,
        "store_bytes_written": store["method_bytes_up"].get("PUT", 0)
        + store["method_bytes_up"].get("POST", 0),
        "store_requests": store["requests"],
        "bytes_ratio": link["bytes_up"] / compressed if compressed else None,
    }


def history_commits(svc: Services, ds: Dataset, client: WarmClient, n: int) -> dict:
    """``n`` single-row commits, each pushed at once: the volume gets n remote LSNs."""
    remote = Remote(svc.direct_graft_url)
    rng = random.Random(9)
    customers = max(ds.spec.orders // 20, 1)
    pushes = []
    busy = 0.0
    try:
        for _ in range(n):
            row = _order_row(rng, customers)
            t = time.perf_counter()
            client.writer.execute(INSERT_SQL, row)
            busy += time.perf_counter() - t
            svc.applied.append((INSERT_SQL, row))
            push = measured_push(svc, client, remote)
            busy += push["seconds"]
            pushes.append(push)
    finally:
        remote.close()
    keys = (
        "seconds",
        "pages",
        "compressed_bytes",
        "requests",
        "bytes_up",
        "object_writes",
        "store_bytes_written",
        "bytes_ratio",
    )
    return {
        "commits": n,
        "commit_and_push_per_s": n / busy,
        "median": {k: median([p[k] for p in pushes]) for k in keys},
        "max": {k: max(p[k] for p in pushes) for k in keys},
        "pushes_within_2_writes": sum(p["object_writes"] <= 2 for p in pushes),
    }


def _native_commits(path: str, rows: list[tuple], journal: str) -> float:
    con = apsw.Connection(path)
    try:
        con.execute(f"PRAGMA journal_mode={journal}").fetchall()
        con.execute("PRAGMA synchronous=FULL")
        t = time.perf_counter()
        for row in rows:
            con.execute(INSERT_SQL, row)
        return len(rows) / (time.perf_counter() - t)
    finally:
        con.close()


def _native_bulk(path: str, rows: list[tuple]) -> float:
    con = apsw.Connection(path)
    try:
        con.execute("PRAGMA journal_mode=WAL").fetchall()
        con.execute("PRAGMA synchronous=FULL")
        t = time.perf_counter()
        with con:
            con.executemany(INSERT_SQL, rows)
        return time.perf_counter() - t
    finally:
        con.close()


def _s3vfs_commits(svc: Services, rows: list[tuple], budget: float) -> dict:
    """sqlite-s3vfs with its defaults (4 KiB blocks) on a new small database: one
    committed insert after another, through the loopback proxy, for at most ``budget``."""
    bucket = s3_bucket(svc.url("s3"))
    vfs = sqlite_s3vfs.S3VFS(bucket=bucket)
    prefix = f"s3vfs-writes/{uuid.uuid4().hex[:8]}.db"
    con = apsw.Connection(prefix, vfs=vfs.name)
    try:
        con.execute(SCHEMA)
        svc.reset("s3")
        t = time.perf_counter()
        done = 0
        for row in rows:
            con.execute(INSERT_SQL, row)
            done += 1
            if time.perf_counter() - t > budget:
                break
        seconds = time.perf_counter() - t
        s = svc.stats("s3")
    finally:
        con.close()
        vfs.unregister()
    return {
        "commits": done,
        "per_s": done / seconds,
        "requests_per_commit": s["requests"] / done,
        "bytes_up_per_commit": s["bytes_up"] / done,
    }


def writes(svc: Services, ds: Dataset, client: WarmClient, cfg: Config, log) -> dict:
    svc.set_link(LOOPBACK)
    rng = random.Random(13)
    customers = max(ds.spec.orders // 20, 1)
    singles = [_order_row(rng, customers) for _ in range(cfg.single_commits)]
    bulk = [_order_row(rng, customers) for _ in range(cfg.bulk_rows)]
    remote = Remote(svc.direct_graft_url)
    out: dict = {"single_commits": cfg.single_commits, "bulk_rows": cfg.bulk_rows}
    try:
        t = time.perf_counter()
        for row in singles:
            client.writer.execute(INSERT_SQL, row)
        out["graft_local_commits_per_s"] = len(singles) / (time.perf_counter() - t)
        out["rollup_push"] = measured_push(svc, client, remote)
        log(
            f"  graft: {out['graft_local_commits_per_s']:.0f} single-row commits/s; "
            f"roll-up push of {len(singles)}: {out['rollup_push']['object_writes']} object writes"
        )

        t = time.perf_counter()
        with client.writer:
            client.writer.executemany(INSERT_SQL, bulk)
        out["graft_bulk_seconds"] = time.perf_counter() - t
        out["bulk_push"] = measured_push(svc, client, remote)
        log(
            f"  graft: bulk insert {out['graft_bulk_seconds']:.2f} s, push "
            f"{out['bulk_push']['seconds']:.2f} s"
        )
    finally:
        remote.close()

    tmp = tempfile.mkdtemp(prefix="native-", dir=svc.work)
    try:
        for journal in ("DELETE", "WAL"):
            path = os.path.join(tmp, f"{journal}.db")
            shutil.copyfile(ds.path, path)
            out[f"native_{journal.lower()}_commits_per_s"] = _native_commits(path, singles, journal)
        out["native_bulk_seconds"] = _native_bulk(os.path.join(tmp, "WAL.db"), bulk)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["s3vfs"] = _s3vfs_commits(svc, singles, min(cfg.budget, 10.0))
    log(
        f"  native: {out['native_delete_commits_per_s']:.0f} commits/s (rollback journal), "
        f"{out['native_wal_commits_per_s']:.0f} (WAL); sqlite-s3vfs "
        f"{out['s3vfs']['per_s']:.1f}/s"
    )
    out["full_file_bytes"] = client.pragma("graft_status")["page_count"] * PAGE
    return out


# -- one B-tree against the whole volume --------------------------------------------------


PREFETCH_TREE = "orders"
PREFETCH_CHECK = "SELECT count(*), sum(amount), max(id) FROM orders"


def prefetch(svc: Services, ds: Dataset, cfg: Config, log) -> dict:
    """Per link, a fresh client (server warm): ``PRAGMA graft_prefetch('orders')``, then a
    full scan of orders, which must move nothing and return native SQLite's rows; next to
    ``PRAGMA graft_hydrate`` (every page of the volume) from another fresh client. A run
    that would take longer than the budget is computed from its loopback run."""
    native = apsw.Connection(ds.path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        expected = native.execute(PREFETCH_CHECK).fetchall()
    finally:
        native.close()
    svc.warm_server()
    out: dict = {}
    for name in cfg.profiles:
        link = PROFILES[name]
        svc.set_link(link)
        loop = out.get("loopback")
        res: dict = {}
        for what, pragma in (
            ("prefetch", f"graft_prefetch('{PREFETCH_TREE}')"),
            ("hydrate", "graft_hydrate"),
        ):
            if loop is not None and predicted_seconds(loop[what], link) > cfg.budget:
                res[what] = modelled(loop[what], link)
                continue
            runs = [_fetch_run(svc, pragma, expected) for _ in range(cfg.prefetch_reps)]
            res[what] = {
                **sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2],  # the median run
                "runs": [round(r["seconds"], 4) for r in runs],
                "rows_agree": all(r["rows_agree"] for r in runs),
            }
        out[name] = res
        p, h = res["prefetch"], res["hydrate"]
        log(
            f"  {name}: prefetch of {PREFETCH_TREE} {p['seconds']:.3f} s, "
            f"{p['bytes_down'] / 1e6:.1f} MB; hydrate {h['seconds']:.3f} s, "
            f"{h['bytes_down'] / 1e6:.1f} MB ({h['how']})"
        )
    return out


def _fetch_run(svc: Services, pragma: str, expected: list) -> dict:
    """One fresh client: the PRAGMA, counted by the link proxy, then the check query."""
    system = Graft(svc, "")
    system.prepare()
    con = system.open()
    try:
        svc.reset("graft")
        t = time.perf_counter()
        got = json.loads(con.execute(f"PRAGMA {pragma}").fetchone()[0])
        seconds = time.perf_counter() - t
        stats = svc.stats("graft")
        svc.reset("graft")
        rows = con.execute(PREFETCH_CHECK).fetchall()
        after = svc.stats("graft")
    finally:
        system.close(con)
    return {
        "seconds": seconds,
        "first_row_seconds": seconds,
        "requests": stats["requests"],
        "round_trips": stats["busy_periods"],
        "bytes_down": stats["bytes_down"],
        "bytes_up": stats["bytes_up"],
        "pages_fetched": got["pages_fetched"],
        "pages": got.get("pages", got.get("page_count")),
        "check_requests": after["requests"],
        "rows_agree": rows == expected,
        "digest": None,
        "how": "measured",
    }


# -- sync catch-up ------------------------------------------------------------------------


def catchup(
    svc: Services, ds: Dataset, client: WarmClient, cfg: Config, cold_res: dict, log
) -> dict:
    """Another client changes ~1% of the pages; the warm client pulls and fetches them."""
    out = {}
    rng = random.Random(17)
    for name in cfg.profiles:
        link = PROFILES[name]
        svc.set_link(LOOPBACK)
        page_count = client.pragma("graft_status")["page_count"]
        ids = rng.sample(range(1, ds.spec.orders + 1), page_count // 100)
        other = tempfile.mkdtemp(prefix="other-", dir=svc.work)
        con = graft_vfs.connect(
            VOLUME,
            remote=svc.direct_graft_url,
            cache_dir=other,
            options=graft_vfs.Options(autopush=False),
        )
        try:
            with con:
                con.executemany(
                    "UPDATE orders SET amount = amount + 1 WHERE id = ?", [(i,) for i in ids]
                )
            json.loads(con.execute("PRAGMA graft_push").fetchone()[0])
            (expected,) = con.execute(
                "SELECT amount FROM orders WHERE id = ?", (ids[0],)
            ).fetchone()
        finally:
            vfs = con.open_vfs
            con.close()
            graft_vfs.unregister(vfs)
            shutil.rmtree(other, ignore_errors=True)

        svc.set_link(link)
        svc.reset("graft")
        t = time.perf_counter()
        pulled = client.pragma("graft_pull")
        hydrated = client.pragma("graft_hydrate")
        seconds = time.perf_counter() - t
        stats = svc.stats("graft")
        (seen,) = client.reader.execute(
            "SELECT amount FROM orders WHERE id = ?", (ids[0],)
        ).fetchone()
        full_bytes = pulled["page_count"] * PAGE
        download = cold_res.get(name, {}).get("lookups", {}).get("download", {})
        out[name] = {
            "changed_pages": pulled["changed_pages"],
            "page_count": pulled["page_count"],
            "changed_fraction": pulled["changed_pages"] / pulled["page_count"],
            "seconds": seconds,
            "requests": stats["requests"],
            "bytes_down": stats["bytes_down"],
            "bytes_up": stats["bytes_up"],
            "pages_fetched": hydrated["pages_fetched"],
            "full_download_bytes": full_bytes,
            "bytes_vs_full_download": stats["bytes_down"] / full_bytes,
            "full_download_seconds": download.get("seconds"),
            "sees_the_change": abs(seen - expected) < 1e-9,
        }
        log(
            f"  {name}: catch-up {seconds:.3f} s, {stats['bytes_down'] / 1e6:.2f} MB "
            f"({100 * out[name]['bytes_vs_full_download']:.2f}% of the file)"
        )
    return out


def link_table() -> dict:
    return {
        name: asdict(link) | {"description": link.describe()} for name, link in PROFILES.items()
    }
