"""Warm point lookups through the graft VFS against native SQLite on a local file.

Both run in this process on the same generated database; the graft replica has every
page cached (read once before timing). Prints JSON with lookups/s and the ratio, fresh
and after 200 commits of history. Usage: python benchmarks/warm_reads.py [--orders N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import apsw

import graft_vfs
from graft_vfs.remote import Remote
from graft_vfs.sample import make_sample_database
from graft_vfs.transfer import import_database


def lookups_per_second(con: apsw.Connection, ids: list[int], rounds: int = 3) -> float:
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for i in ids:
            con.execute("SELECT amount FROM orders WHERE id = ?", (i,)).fetchone()
        best = max(best, len(ids) / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="graft-bench-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--store", os.path.join(work, "store"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    url = proc.stdout.readline().rsplit(" ", 1)[1].strip()  # type: ignore[union-attr]
    try:
        db = make_sample_database(os.path.join(work, "native.db"), orders=args.orders)
        import_database(Remote(url), db, "bench")
        native = apsw.Connection(db)
        replica = graft_vfs.connect("bench", remote=url, cache_dir=os.path.join(work, "cache"))
        replica.execute("SELECT sum(amount) FROM orders").fetchall()  # warm every page
        ids = [random.Random(1).randint(1, args.orders) for _ in range(args.lookups)]
        ids = random.Random(2).sample(ids, len(ids))
        result = {"orders": args.orders, "lookups": args.lookups}
        result["native_per_s"] = lookups_per_second(native, ids)
        result["graft_per_s"] = lookups_per_second(replica, ids)
        result["ratio"] = result["graft_per_s"] / result["native_per_s"]
        writer = graft_vfs.connect("bench", remote=url, cache_dir=os.path.join(work, "cache"))
        for i in range(200):
            writer.execute("UPDATE customers SET name = ? WHERE id = ?", (f"n{i}", i + 1))
        result["graft_after_200_commits_per_s"] = lookups_per_second(replica, ids)
        result["ratio_after_200_commits"] = (
            result["graft_after_200_commits_per_s"] / result["native_per_s"]
        )
        print(json.dumps(result, indent=2))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
