"""The benchmark database: graft_vfs.sample's indexed orders, scaled up, plus a wide table.

The rows of ``customers`` and ``orders`` are graft_vfs.sample's (the same generator,
the same seed), and ``orders`` has one more column, ``ref``: a unique integer key in an
order unrelated to the rowid (``id * REF_MULTIPLIER mod REF_MODULUS``, a bijection) with
a unique index, so lookups by an indexed non-rowid key descend that index, then the
table. As in the sample, the indexes exist before the rows go in, so they are filled in
key order as an application would fill them (not packed as by VACUUM or a late CREATE
INDEX).

Generated once into a cache directory and reused by later runs with the same
parameters (the file name is a hash of them and of GENERATOR_VERSION).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

import apsw

from graft_vfs.sample import sample_rows

GENERATOR_VERSION = 3  # 3: orders.ref and its unique index orders_ref, filled with the rows
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "graft-bench")
WIDE_COLUMNS = 40
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
REF_MODULUS = 2_147_483_647  # a prime: multiplying by anything below it is a bijection
REF_MULTIPLIER = 48_271


def order_ref(order_id: int) -> int:
    """The ``ref`` key of order ``order_id`` (unique: a bijection of the rowid)."""
    return order_id * REF_MULTIPLIER % REF_MODULUS


@dataclass(frozen=True)
class DataSpec:
    orders: int = 550_000  # graft_vfs.sample's orders (2 secondary indexes): ~72 MB
    wide_rows: int = 25_000  # 40 columns, ~2 KB a row: ~50 MB
    seed: int = 7

    def key(self) -> str:
        text = json.dumps({**asdict(self), "v": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class Dataset:
    path: str
    spec: DataSpec
    bytes: int
    pages: int
    tables: dict[str, int]  # b-tree name -> pages
    generated_seconds: float | None  # None: reused from the cache


def _wide_row(rng: random.Random, i: int) -> list:
    row: list = [i]
    for c in range(WIDE_COLUMNS):
        kind = c % 3
        if kind == 0:
            row.append(rng.randint(0, 10**12))
        elif kind == 1:
            row.append(rng.random() * 1e6)
        else:
            row.append("".join(rng.choices(ALPHABET, k=rng.randint(60, 140))))
    return row


# graft_vfs.sample's schema, with orders.ref (nullable: the benchmarks' own inserts
# leave it out) and its unique index
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
    note TEXT NOT NULL,
    ref INTEGER
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE INDEX orders_created ON orders(created);
CREATE UNIQUE INDEX orders_ref ON orders(ref);
"""


def _sample(con: apsw.Connection, spec: DataSpec) -> None:
    """graft_vfs.sample's rows (the same generator and seed), each order with its ref."""
    customer_rows, order_rows = sample_rows(spec.orders, spec.seed)
    con.execute("PRAGMA page_size=4096")
    con.execute("PRAGMA journal_mode=DELETE").fetchall()
    con.execute(SCHEMA)
    with con:
        con.executemany("INSERT INTO customers VALUES(?,?,?)", customer_rows)
        con.executemany(
            "INSERT INTO orders VALUES(?,?,?,?,?,?)",
            ((*row, order_ref(row[0])) for row in order_rows),
        )


def _generate(path: str, spec: DataSpec) -> None:
    if os.path.exists(path):
        os.remove(path)
    rng = random.Random(spec.seed + 1)
    cols = ", ".join(f"c{c:02d} {('INTEGER', 'REAL', 'TEXT')[c % 3]}" for c in range(WIDE_COLUMNS))
    con = apsw.Connection(path)
    try:
        _sample(con, spec)
        con.execute(f"CREATE TABLE wide(id INTEGER PRIMARY KEY, {cols})")
        marks = ",".join("?" * (WIDE_COLUMNS + 1))
        with con:
            con.executemany(
                f"INSERT INTO wide VALUES({marks})",
                (_wide_row(rng, i) for i in range(1, spec.wide_rows + 1)),
            )
        con.execute("ANALYZE")
    finally:
        con.close()


def _table_pages(path: str) -> dict[str, int]:
    con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = con.execute("SELECT name, count(*) FROM dbstat GROUP BY name").fetchall()
        return {name: n for name, n in rows}
    except apsw.SQLError:  # no dbstat in this SQLite build
        return {}
    finally:
        con.close()


def with_page_size(ds: Dataset, page_size: int) -> str:
    """A copy of the dataset's database with ``page_size`` pages (same rows), cached."""
    path = ds.path.removesuffix(".db") + f"-p{page_size}.db"
    if not os.path.exists(path):
        tmp = path + ".tmp"
        shutil.copyfile(ds.path, tmp)
        con = apsw.Connection(tmp)
        try:
            con.execute("PRAGMA journal_mode=DELETE").fetchall()
            con.execute(f"PRAGMA page_size={int(page_size)}")
            con.execute("VACUUM")
            (got,) = con.execute("PRAGMA page_size").fetchone()
        finally:
            con.close()
        if got != page_size:
            raise RuntimeError(f"VACUUM left page size {got}, wanted {page_size}")
        os.replace(tmp, path)
    return path


def dataset(spec: DataSpec, cache_dir: str = DEFAULT_CACHE) -> Dataset:
    """The database for ``spec``, generated into ``cache_dir`` unless already there."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"bench-{spec.key()}.db")
    took = None
    if not os.path.exists(path):
        tmp = path + ".tmp"
        started = time.perf_counter()
        _generate(tmp, spec)
        os.replace(tmp, path)
        took = time.perf_counter() - started
    size = os.path.getsize(path)
    return Dataset(path, spec, size, size // 4096, _table_pages(path), took)
