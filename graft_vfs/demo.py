"""``make demo``: a server on a temporary directory, a 20+ MB import, a stateless replica.

Prints, for each query, its rows and how many pages the replica fetched to answer it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any

import graft_vfs
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.remote import Remote
from graft_vfs.sample import make_sample_database

QUERIES = [
    (
        "order by primary key",
        "SELECT id, customer_id, created, amount FROM orders WHERE id = 123456",
    ),
    (
        "orders of one customer (index)",
        "SELECT id, created, amount FROM orders WHERE customer_id = 4242 ORDER BY id",
    ),
    (
        "join",
        "SELECT c.name, c.country, count(*), round(sum(o.amount), 2) FROM customers c "
        "JOIN orders o ON o.customer_id = c.id WHERE c.id = 777 GROUP BY c.id",
    ),
    (
        "date range (index)",
        "SELECT created, count(*) FROM orders "
        "WHERE created BETWEEN '2026-03-01' AND '2026-03-03' GROUP BY created",
    ),
    (
        "customers per country",
        "SELECT country, count(*) FROM customers GROUP BY country ORDER BY country LIMIT 3",
    ),
]


def start_server(store: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft_server", "--store", store, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    from graft_server.serve import LISTENING  # the line a started server prints

    assert proc.stdout is not None
    for line in proc.stdout:  # until the server listens, or exits
        if line.startswith(LISTENING):
            return proc, line[len(LISTENING) :].strip()
    raise SystemExit(f"graft server exited with {proc.wait()} before it listened")


def main() -> None:
    work = tempfile.mkdtemp(prefix="graft-demo-")
    proc, url = start_server(os.path.join(work, "store"))
    try:
        print(f"graft server at {url}, store in {work}/store")
        db = make_sample_database(os.path.join(work, "sample.db"))
        size = os.path.getsize(db)
        t = time.perf_counter()
        lsn = import_database(Remote(url), db, "orders")
        print(
            f"imported {db} ({size / 1e6:.1f} MB, {size // 4096} pages) as volume 'orders' "
            f"at LSN {lsn} in {time.perf_counter() - t:.1f} s"
        )

        cache = os.path.join(work, "replica-cache")
        con = graft_vfs.connect("orders", remote=url, cache_dir=cache)
        print(f"opened a stateless replica with an empty cache in {cache}\n")

        def pragma(name: str) -> dict[str, Any]:
            row = con.execute(f"PRAGMA {name}").fetchone()
            assert row is not None
            answer: dict[str, Any] = json.loads(row[0])
            return answer

        def stats() -> dict[str, Any]:
            return pragma("graft_stats")

        pages = pragma("graft_status")["page_count"]
        for title, sql in QUERIES:
            before = stats()
            t = time.perf_counter()
            rows = con.execute(sql).fetchall()
            ms = (time.perf_counter() - t) * 1000
            after = stats()
            fetched = after["pages_fetched"] - before["pages_fetched"]
            print(f"-- {title}: {sql}")
            for row in rows[:5]:
                print("   ", row)
            if len(rows) > 5:
                print(f"    ... {len(rows)} rows")
            print(
                f"   pages fetched: {fetched} of {pages} in the volume "
                f"({100 * fetched / pages:.2f}%), {after['requests'] - before['requests']} "
                f"requests, {ms:.0f} ms\n"
            )
        total = stats()
        print(
            f"total: {total['pages_fetched']} of {pages} pages "
            f"({100 * total['pages_fetched'] / pages:.2f}%), "
            f"{total['bytes_fetched'] / 1e3:.0f} kB over {total['requests']} requests"
        )
        con.close()
        replica_query(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def replica_query(url: str) -> None:
    """Start a `graft replica` of 'orders' and query it with a plain HTTP request."""
    replica = subprocess.Popen(
        [sys.executable, "-m", "graft_vfs", "replica", "orders", "--remote", url, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert replica.stdout is not None
        ready = "graft replica listening on "
        for line in replica.stdout:
            if line.startswith(ready):
                break
        else:
            raise SystemExit(f"graft replica exited with {replica.wait()} before it listened")
        query = urllib.parse.urlencode(
            {"sql": "SELECT count(*) AS orders, round(sum(amount), 2) AS total FROM orders"}
        )
        address = f"{line[len(ready) :].strip()}/v1/query?{query}"
        with urllib.request.urlopen(address, timeout=60) as answer:
            body = answer.read().decode()
        print(f"\ngraft replica, queried over plain HTTP:\n  GET {address}\n  {body}")
    finally:
        replica.terminate()
        replica.wait(timeout=10)


if __name__ == "__main__":
    main()
