"""A reproducible sample database (customers and orders) for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import apsw

SCHEMA = """
CREATE TABLE customers(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    country TEXT NOT NULL
);
CREATE TABLE orders(
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    created TEXT NOT NULL,
    amount REAL NOT NULL,
    note TEXT NOT NULL
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE INDEX orders_created ON orders(created);
"""

COUNTRIES = ["DE", "FR", "JP", "US", "BR", "IN", "NG", "AU", "CA", "SE"]


def sample_rows(orders: int, seed: int) -> tuple[Iterator[tuple], Iterator[tuple]]:
    """The rows of ``customers`` and of ``orders``, from one random sequence: consume the
    customers first (as an INSERT of each table in turn does) for the same rows each time."""
    rng = random.Random(seed)
    customers = max(orders // 20, 1)
    return (
        ((i, f"customer {i}", rng.choice(COUNTRIES)) for i in range(1, customers + 1)),
        (
            (
                i,
                rng.randint(1, customers),
                f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                round(rng.uniform(1, 500), 2),
                "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=60)),
            )
            for i in range(1, orders + 1)
        ),
    )


def make_sample_database(path: str, *, orders: int = 200_000, seed: int = 7) -> str:
    """Create (or replace) a SQLite file of ``orders`` orders, about 120 bytes per order."""
    if os.path.exists(path):
        os.remove(path)
    customer_rows, order_rows = sample_rows(orders, seed)
    con = apsw.Connection(path)
    try:
        con.execute("PRAGMA page_size=4096")
        con.execute("PRAGMA journal_mode=DELETE").fetchall()
        con.execute(SCHEMA)
        with con:
            con.executemany("INSERT INTO customers VALUES(?,?,?)", customer_rows)
            con.executemany("INSERT INTO orders VALUES(?,?,?,?,?)", order_rows)
    finally:
        con.close()
    return path
