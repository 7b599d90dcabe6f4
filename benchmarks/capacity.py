"""The capacity run of issue 11: ``python -m benchmarks.capacity [--quick]``.

How many page reads per second one graft server process sustains with 8 concurrent
client processes, with its frame cache cold (restarted just before: every page is read
for the first time, from S3) and warm (every page read once before), and how much
server CPU each read costs; then what one single-row commit costs the server.

Topology: SeaweedFS (S3) <- a counting proxy <- one ``graft server`` process <- N client
processes (``graft_vfs.client.remote.Remote``, the client's own transport, which
verifies every page it receives), all on 127.0.0.1 without link delays: the clients
ask as fast as the server answers. Each client reads its own pages: in the cold phase
a disjoint share of a random permutation of all pages (so no page is asked twice), in
the warm phase random pages. Two request shapes: one page per request (what a demand
read of a cold lookup sends) and 32 pages per request (what a prefetch or hydrate
sends). Server CPU is the server process's user + system time from ``/proc/PID/stat``
over the measured window; store requests and bytes come from the proxy.

On a machine with fewer cores than clients + server, the clients compete with the
server for CPU, so pages per second measured here is a floor; ``pages per server CPU
second`` (pages / server CPU) is what one server process would sustain with a core to
itself, and is the figure ``docs/capacity.md`` builds on. Results go to
``benchmarks/results/capacity.json``; ``--doc`` then rewrites the measured section of
``docs/capacity.md`` from it and from ``latest.json`` (the per-lookup and per-commit
figures of ``python -m benchmarks.run``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(ROOT, "docs", "capacity.md")
BEGIN = "<!-- capacity:begin (written by python -m benchmarks.capacity --doc) -->"
END = "<!-- capacity:end -->"
SHAPES = {"demand": 1, "batch": 32}  # pages per request


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the client processes -----------------------------------------------------------------


def _worker(url: str, volume: str, tasks, results) -> None:
    """One client process: runs tasks from ``tasks`` until it gets None."""
    from graft_vfs.client.remote import Remote, Traffic

    remote = Remote(url, timeout=120)
    head = remote.snapshot(volume)
    results.put(("ready", head.lsn, head.page_count))
    while True:
        task = tasks.get()
        if task is None:
            break
        pages, per_request, start_at, end_at = task
        traffic = Traffic()
        while time.monotonic() < start_at:
            time.sleep(0.001)
        cpu = time.process_time()
        done = errors = 0
        for i in range(0, len(pages), per_request):
            if time.monotonic() >= end_at:
                break
            chunk = pages[i : i + per_request]
            try:
                got = remote.read_pages(volume, head.lsn, chunk, traffic)
                done += len(got)
            except Exception:  # counted, and the run goes on: the report says how many
                errors += 1
        results.put(
            {
                "pages": done,
                "requests": traffic.requests,
                "bytes": traffic.bytes_received,
                "errors": errors,
                "cpu": time.process_time() - cpu,
                "finished": time.monotonic(),
            }
        )
    remote.close()


class Clients:
    """N client processes (spawned, so none inherits the harness's threads or sockets)."""

    def __init__(self, url: str, volume: str, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=_worker, args=(url, volume, q, self.results), daemon=True)
            for q in self.queues
        ]
        for p in self.procs:
            p.start()
        ready = [self.results.get(timeout=120) for _ in self.procs]
        self.lsn, self.page_count = ready[0][1], ready[0][2]

    def run(self, shares: list[list[int]], per_request: int, seconds: float, server_pid: int):
        """Every client reads its share; returns the totals and the server's CPU."""
        from benchmarks.systems import cpu_seconds

        start_at = time.monotonic() + 0.5
        end_at = start_at + seconds
        for q, share in zip(self.queues, shares):
            q.put((share, per_request, start_at, end_at))
        while time.monotonic() < start_at:
            time.sleep(0.001)
        cpu0 = cpu_seconds(server_pid)
        got = [self.results.get(timeout=seconds + 300) for _ in self.queues]
        cpu1 = cpu_seconds(server_pid)
        wall = max(g["finished"] for g in got) - start_at
        keys = ("pages", "requests", "bytes", "errors", "cpu")
        return {k: sum(g[k] for g in got) for k in keys} | {
            "wall": wall,
            "server_cpu": cpu1 - cpu0,
        }

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# -- the run --------------------------------------------------------------------------------


def _shares(page_count: int, n: int, *, cold: bool, seed: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    if cold:
        pages = list(range(page_count))
        rng.shuffle(pages)
        return [pages[i::n] for i in range(n)]
    return [[rng.randrange(page_count) for _ in range(length)] for _ in range(n)]


def _phase(svc, clients: Clients, shape: str, cold: bool, seconds: float, seed: int) -> dict:
    per_request = SHAPES[shape]
    if cold:
        svc.restart_server()
    else:
        svc.warm_server()
    shares = _shares(clients.page_count, len(clients.queues), cold=cold, seed=seed, length=200_000)
    svc.reset("store")
    got = clients.run(shares, per_request, seconds, svc.server_pid)
    store = svc.stats("store")
    pages = max(got["pages"], 1)
    out = {
        "shape": shape,
        "pages_per_request": per_request,
        "server_cache": "cold" if cold else "warm",
        **got,
        "pages_per_s": got["pages"] / got["wall"],
        "requests_per_s": got["requests"] / got["wall"],
        "server_cpu_ms_per_page": 1000 * got["server_cpu"] / pages,
        "server_cpu_ms_per_request": 1000 * got["server_cpu"] / max(got["requests"], 1),
        "pages_per_server_cpu_s": got["pages"] / got["server_cpu"] if got["server_cpu"] else None,
        "server_cpu_share": got["server_cpu"] / got["wall"],
        "store_requests": store["requests"],
        "store_bytes_down": store["bytes_down"],
        "store_requests_per_page": store["requests"] / pages,
        "bytes_per_page": got["bytes"] / pages,
    }
    log(
        f"  {shape:6} ({per_request:2} pages/request), server cache {out['server_cache']}: "
        f"{out['pages_per_s']:7.0f} pages/s, {out['requests_per_s']:6.0f} requests/s; server "
        f"CPU {out['server_cpu_ms_per_page']:.3f} ms/page ({100 * out['server_cpu_share']:.0f}% "
        f"of a core); {out['store_requests_per_page']:.3f} store requests/page"
        + (f"; {got['errors']} errors" if got["errors"] else "")
    )
    return out


def _commits(svc, n: int) -> dict:
    """``n`` single-row commits, each pushed at once, by one client: server CPU and store
    traffic per commit."""
    import apsw

    import graft_vfs
    from benchmarks.services import VOLUME
    from benchmarks.systems import cpu_seconds

    cache = tempfile.mkdtemp(prefix="capacity-writer-")
    con = graft_vfs.connect(
        VOLUME,
        remote=svc.direct_graft_url,
        cache_dir=cache,
        options=graft_vfs.Options(autopush=False),
    )
    try:
        assert isinstance(con, apsw.Connection)
        con.execute("UPDATE orders SET amount = amount WHERE id = 1")  # fetch what it needs
        con.execute("PRAGMA graft_push").fetchall()
        svc.reset("store")
        cpu0, t = cpu_seconds(svc.server_pid), time.perf_counter()
        for i in range(n):
            con.execute("UPDATE orders SET amount = amount + 1 WHERE id = ?", (1 + i * 997,))
            con.execute("PRAGMA graft_push").fetchall()
        seconds = time.perf_counter() - t
        cpu = cpu_seconds(svc.server_pid) - cpu0
        store = svc.stats("store")
    finally:
        vfs = con.open_vfs
        con.close()
        graft_vfs.unregister(vfs)
        shutil.rmtree(cache, ignore_errors=True)
    writes = store["methods"].get("PUT", 0) + store["methods"].get("POST", 0)
    out = {
        "commits": n,
        "commits_per_s": n / seconds,
        "server_cpu_ms_per_commit": 1000 * cpu / n,
        "store_requests_per_commit": store["requests"] / n,
        "store_writes_per_commit": writes / n,
        "store_bytes_up_per_commit": store["bytes_up"] / n,
        "store_methods": store["methods"],
    }
    log(
        f"  commits: {out['commits_per_s']:.0f}/s by one client, server CPU "
        f"{out['server_cpu_ms_per_commit']:.1f} ms, {out['store_requests_per_commit']:.1f} store "
        f"requests ({out['store_writes_per_commit']:.1f} writes), "
        f"{out['store_bytes_up_per_commit'] / 1e3:.1f} kB up per commit"
    )
    return out


def measure(quick: bool, clients: int, seconds: float | None, cache_dir: str) -> dict:
    from benchmarks.data import DataSpec, dataset
    from benchmarks.run import machine
    from benchmarks.services import VOLUME, Services

    seconds = seconds or (4.0 if quick else 15.0)
    started = time.perf_counter()
    ds = dataset(DataSpec(), cache_dir)
    result: dict = {
        "mode": "quick" if quick else "full",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "clients": clients,
        "seconds_per_phase": seconds,
        "data": {"bytes": ds.bytes, "pages": ds.pages},
    }
    with Services(ds.path, ds.path, s3vfs_block_size=65536) as svc:
        svc.load(full=False, s3vfs=False)
        log(f"capacity: {clients} client processes, {seconds:g} s per phase")
        pool = Clients(svc.direct_graft_url, VOLUME, clients)
        try:
            phases = []
            for i, shape in enumerate(SHAPES):
                for cold in (True, False):
                    phases.append(_phase(svc, pool, shape, cold, seconds, seed=11 + i))
        finally:
            pool.close()
        result["phases"] = phases
        result["commit"] = _commits(svc, 30 if quick else 100)
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["duration_seconds"] = time.perf_counter() - started
    return result


# -- the model of docs/capacity.md ------------------------------------------------------


# Example object-store prices (parameters: substitute your provider's). USD.
PRICES = {
    "get_per_1000": 0.0004,  # GET / ranged GET requests
    "put_per_1000": 0.005,  # PUT / POST / LIST requests
    "egress_per_gb": 0.09,  # bytes leaving the provider (server -> clients on the internet)
}


def figures(cap: dict, bench: dict | None) -> dict:
    """The measured figures the model uses, with where each comes from."""
    by = {(p["shape"], p["server_cache"]): p for p in cap["phases"]}
    f: dict = {
        "measured": cap["finished"][:10],
        "machine": f"{cap['machine']['cpu']}, {cap['machine']['cores']} cores",
        "git_commit": cap["machine"].get("git_commit"),
        "pages_per_server_cpu_s_demand_warm": by[("demand", "warm")]["pages_per_server_cpu_s"],
        "pages_per_server_cpu_s_demand_cold": by[("demand", "cold")]["pages_per_server_cpu_s"],
        "pages_per_server_cpu_s_batch_warm": by[("batch", "warm")]["pages_per_server_cpu_s"],
        "pages_per_server_cpu_s_batch_cold": by[("batch", "cold")]["pages_per_server_cpu_s"],
        "server_cpu_ms_per_request_demand_warm": by[("demand", "warm")][
            "server_cpu_ms_per_request"
        ],
        "server_cpu_ms_per_request_demand_cold": by[("demand", "cold")][
            "server_cpu_ms_per_request"
        ],
        "pages_per_s_measured_demand_warm": by[("demand", "warm")]["pages_per_s"],
        "store_requests_per_page_cold": by[("demand", "cold")]["store_requests_per_page"],
        "server_cpu_ms_per_commit": cap["commit"]["server_cpu_ms_per_commit"],
        "store_requests_per_commit": cap["commit"]["store_requests_per_commit"],
        "store_writes_per_commit": cap["commit"]["store_writes_per_commit"],
        "store_bytes_up_per_commit": cap["commit"]["store_bytes_up_per_commit"],
    }
    bench = bench or {}
    loop = bench.get("cold", {}).get("loopback", {}).get("lookups", {})
    warm, cold = loop.get("graft"), loop.get("graft_server_cold")
    n = bench.get("workloads", {}).get("lookups", {}).get("statements", 100)
    if warm:
        f["lookup_source"] = (
            f"`python -m benchmarks.run` ({bench['mode']}) on {bench['finished'][:10]}"
        )
        f["requests_per_lookup"] = warm["requests"] / n
        f["pages_per_lookup"] = warm["pages"] / n
        f["bytes_per_lookup"] = warm["bytes_down"] / n
        f["store_requests_per_lookup_server_warm"] = warm["store_requests"] / n
    if cold:  # includes loading the volume's index after the restart (~100 requests)
        f["store_requests_per_100_lookups_after_restart"] = cold["store_requests"] * 100 / n
    if warm:  # a page no server has read: one ranged GET each (measured per page above)
        f["store_requests_per_lookup_server_cold"] = (
            f["pages_per_lookup"] * f["store_requests_per_page_cold"]
        )
    return f


def model(
    f: dict,
    clients: int,
    lookups_per_client_s: float,
    commits_per_client_s: float,
    prices: dict = PRICES,
    utilisation: float = 0.7,
) -> dict:
    """Servers, object-store requests and bytes, and their price, for ``clients``.

    One server process uses one core (Python). Page reads cost server CPU by request
    (demand reads, the measured shape of a cold lookup) and commits by commit; a server
    runs at ``utilisation`` of its core at most. Object-store requests per cold lookup
    are given for a server whose cache holds the pages (warm) and one that has never
    read them (cold): real fleets lie between.
    """
    lookups = clients * lookups_per_client_s
    commits = clients * commits_per_client_s
    cpu_per_lookup = f["requests_per_lookup"] * f["server_cpu_ms_per_request_demand_warm"] / 1000
    cpu_per_lookup_cold = (
        f["requests_per_lookup"] * f["server_cpu_ms_per_request_demand_cold"] / 1000
    )
    cpu_commit = f["server_cpu_ms_per_commit"] / 1000
    cores_warm = lookups * cpu_per_lookup + commits * cpu_commit
    cores_cold = lookups * cpu_per_lookup_cold + commits * cpu_commit
    store_cold = f.get("store_requests_per_lookup_server_cold", 0.0)
    store_warm = f.get("store_requests_per_lookup_server_warm", 0.0)
    day = 86_400
    gets_cold_day = lookups * store_cold * day
    puts_day = commits * f["store_writes_per_commit"] * day
    other_commit_day = (
        commits * (f["store_requests_per_commit"] - f["store_writes_per_commit"]) * day
    )
    egress_day_gb = lookups * f["bytes_per_lookup"] * day / 1e9
    return {
        "clients": clients,
        "lookups_per_s": lookups,
        "commits_per_s": commits,
        "servers_cache_warm": max(1, math.ceil(cores_warm / utilisation)),
        "servers_cache_cold": max(1, math.ceil(cores_cold / utilisation)),
        "store_requests_per_lookup": (store_warm, store_cold),
        "store_gets_per_day_cold": gets_cold_day,
        "store_writes_per_day": puts_day,
        "store_bytes_written_per_day": commits * f["store_bytes_up_per_commit"] * day,
        "client_bytes_per_day": lookups * f["bytes_per_lookup"] * day,
        "usd_per_day_store_reads_cold": gets_cold_day / 1000 * prices["get_per_1000"],
        "usd_per_day_store_writes": (puts_day + other_commit_day) / 1000 * prices["put_per_1000"],
        "usd_per_day_egress": egress_day_gb * prices["egress_per_gb"],
    }


def _gb(b: float) -> str:
    gb = b / 1e9
    return f"{gb:,.0f} GB" if gb >= 10 else f"{gb:.2g} GB"


def _n(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:.3g} billion"
    if x >= 1e6:
        return f"{x / 1e6:.3g} million"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


LOADS = [  # (clients, cold lookups per client per second, commits per client per second)
    (1_000, 1.0, 0.1),
    (1_000_000, 0.01, 0.001),
]


def markdown(f: dict) -> str:
    # A figure not measured (no server CPU seen in a short phase) prints as nan.
    f = {k: float("nan") if v is None else v for k, v in f.items()}
    out = [
        f"Measured on {f['measured']} ({f['machine']}, commit {f['git_commit']}) by "
        "`python -m benchmarks.capacity`; per-lookup figures from "
        f"{f.get('lookup_source', 'no benchmarks/results/latest.json')}.",
        "",
        "| figure | value | how it is obtained |",
        "|---|---|---|",
        f"| page reads per server CPU second, 1 page/request, cache warm | "
        f"{f['pages_per_server_cpu_s_demand_warm']:,.0f} | pages read by 8 clients / the "
        "server's CPU time (`/proc`) |",
        f"| same, cache cold (every page from S3) | {f['pages_per_server_cpu_s_demand_cold']:,.0f}"
        " | same, server restarted first |",
        f"| same, 32 pages/request, warm / cold | {f['pages_per_server_cpu_s_batch_warm']:,.0f} /"
        f" {f['pages_per_server_cpu_s_batch_cold']:,.0f} | same |",
        f"| server CPU per read request (1 page), warm / cold | "
        f"{f['server_cpu_ms_per_request_demand_warm']:.2f} / "
        f"{f['server_cpu_ms_per_request_demand_cold']:.2f} ms | same |",
        f"| page reads per second measured (8 clients sharing the machine) | "
        f"{f['pages_per_s_measured_demand_warm']:,.0f} | a floor: clients and server share "
        "the cores |",
        f"| store requests per page read, cache cold | {f['store_requests_per_page_cold']:.3f}"
        " | counting proxy between server and S3 |",
    ]
    if "requests_per_lookup" in f:
        out += [
            f"| requests / pages / bytes per cold lookup (server warm) | "
            f"{f['requests_per_lookup']:.2f} / {f['pages_per_lookup']:.2f} / "
            f"{f['bytes_per_lookup'] / 1e3:.1f} kB | 100 cold lookups on loopback, `make bench` |",
            f"| store requests per cold lookup, server warm / cold | "
            f"{f['store_requests_per_lookup_server_warm']:.2f} / "
            f"{f['store_requests_per_lookup_server_cold']:.2f} | warm: measured over the 100 "
            "lookups; cold: pages per lookup x store requests per page (cache cold), an upper "
            "bound: lookups share interior pages |",
        ]
        if "store_requests_per_100_lookups_after_restart" in f:
            out.append(
                "| store requests of 100 cold lookups right after a server restart | "
                f"{f['store_requests_per_100_lookups_after_restart']:.0f} | includes loading "
                "the volume's index (about 100 requests, see the one-lookup breakdown) |"
            )
    out += [
        f"| server CPU per single-row commit (with its push) | "
        f"{f['server_cpu_ms_per_commit']:.1f} ms | one client committing and pushing |",
        f"| store requests / writes / bytes per commit | {f['store_requests_per_commit']:.1f} / "
        f"{f['store_writes_per_commit']:.1f} / {f['store_bytes_up_per_commit'] / 1e3:.1f} kB | "
        "counting proxy |",
        "",
    ]
    if "requests_per_lookup" not in f:
        out.append("(No lookup figures: run `make bench` first, then `--doc` again.)")
        return "\n".join(out)
    out += [
        "With the example prices "
        + ", ".join(f"`{k}` = {v}" for k, v in PRICES.items())
        + " (USD; parameters, not quotes):",
        "",
        "| clients | load | servers (cache warm / cold) | store GETs per cold lookup "
        "(warm / cold server) | store writes per day | bytes to clients per day "
        "| store reads / writes / egress USD per day |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, lps, cps in LOADS:
        m = model(f, clients, lps, cps)
        sw, sc = m["store_requests_per_lookup"]
        out.append(
            f"| {clients:,} | per client {lps:g} cold lookups/s and {cps:g} commits/s "
            f"({_n(m['lookups_per_s'])} lookups/s, {_n(m['commits_per_s'])} commits/s) | "
            f"{m['servers_cache_warm']:,} / {m['servers_cache_cold']:,} | {sw:.2f} / {sc:.2f} | "
            f"{_n(m['store_writes_per_day'])} ({_gb(m['store_bytes_written_per_day'])}) | "
            f"{_gb(m['client_bytes_per_day'])} | "
            f"{m['usd_per_day_store_reads_cold']:,.2f} (all cold) / "
            f"{m['usd_per_day_store_writes']:,.2f} / {m['usd_per_day_egress']:,.2f} |"
        )
    return "\n".join(out)


def update_doc(f: dict, doc: str = DOC) -> None:
    with open(doc) as fh:
        text = fh.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no capacity markers ({BEGIN} ... {END})")
    block = f"{BEGIN}\n{markdown(f)}\n{END}"
    with open(doc, "w") as fh:
        fh.write(pattern.sub(lambda _: block, text))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.data import DEFAULT_CACHE

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 s per phase instead of 15")
    parser.add_argument("--clients", type=int, default=8, help="client processes (8)")
    parser.add_argument("--seconds", type=float, help="seconds per phase")
    parser.add_argument("--out", default=RESULTS, help="directory for capacity.json")
    parser.add_argument("--cache-dir", default=os.environ.get("GRAFT_BENCH_CACHE", DEFAULT_CACHE))
    parser.add_argument(
        "--doc",
        action="store_true",
        help="do not measure: rewrite docs/capacity.md's figures from capacity.json "
        "and latest.json",
    )
    parser.add_argument(
        "--latest",
        help="the python -m benchmarks.run results with the per-lookup figures "
        "(default: latest.json next to capacity.json)",
    )
    args = parser.parse_args(argv)
    path = os.path.join(args.out, "capacity.json")
    if not args.doc:
        if args.clients < 1:
            parser.error("--clients must be at least 1")
        result = measure(args.quick, args.clients, args.seconds, args.cache_dir)
        os.makedirs(args.out, exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {path} in {result['duration_seconds']:.0f} s")
    with open(path) as fh:
        cap = json.load(fh)
    bench = None
    latest = args.latest or os.path.join(args.out, "latest.json")
    if os.path.exists(latest):
        with open(latest) as fh:
            bench = json.load(fh)
    f = figures(cap, bench)
    print(markdown(f))
    if args.doc:
        update_doc(f)
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
