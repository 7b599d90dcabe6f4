"""The local store's page file: page data at 4 KiB slots beside the store's SQLite file.

- A commit writes its pages to free slots inside its store transaction: a process killed
  between those writes and the commit leaves the slots free, and the next commit takes
  them.
- A slot freed by eviction and taken again while a reader held its old row: the reader's
  checksum fails, it looks the row up again and reads the new row, never CorruptData.
- A page file truncated or overwritten reads right or raises CorruptData naming the
  cache and the fix; one missing while rows name its slots is refused at open.
- A store of the format before the page file (data inline in the rows) is upgraded at
  open without moving data: its rows read as they are, new pages go to the page file.
- Maintenance moves pages down from the page file's tail and cuts it, and only durable
  commits sync it (fetched pages are written unsynced).

These use the local store alone: no server.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import apsw
import pytest

from graft_vfs.client import pagefile
from graft_vfs.client.local import FORMAT, STORE_FILE, LocalStore
from graft_vfs.client.pagefile import PAGES_FILE
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.ids import PAGE_SIZE
from support.clients import child_env
from support.old_cache import inline_page_data


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def slot_of(store: LocalStore, v: int, pageno: int, lsn: int) -> int | None:
    row = store._page_rows(v, pageno, lsn)
    assert row is not None
    return row[3]


def assert_names_cache_and_fix(message: str, cache: str) -> None:
    assert os.path.join(cache, STORE_FILE) in message
    assert f"delete the directory {cache}" in message


def test_a_process_killed_between_writing_pages_and_committing_leaves_the_slots_free(tmp_path):
    cache = str(tmp_path)
    store = LocalStore(cache)
    v = store.create_volume("v", 0, 0).row_id
    lsn = store.commit(v, 0, {p: page(p) for p in range(10)}, 10)
    store.close()

    child = textwrap.dedent(
        f"""
        from graft_vfs.client.local import LocalStore
        store = LocalStore({cache!r})
        store.commit({v}, {lsn}, {{p: bytes([7]) * 4096 for p in range(5, 15)}}, 15)
        print("committed")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child],
        env=child_env("client.commit.before_durable"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert "committed" not in proc.stdout
    # Its pages were written (slots 10 to 19), its rows never committed.
    assert os.path.getsize(os.path.join(cache, PAGES_FILE)) == 20 * PAGE_SIZE

    store = LocalStore(cache)
    try:
        assert store.load_volume("v").local_lsn == lsn
        assert store.pages_at(v, range(10), lsn) == {p: page(p) for p in range(10)}
        assert store.read_page(v, 12, lsn) is None
        assert store._slot_end() == 10  # the killed commit's slots are free...
        again = store.commit(v, lsn, {p: page(100 + p) for p in range(5, 15)}, 15)
        assert sorted(slot_of(store, v, p, again) for p in range(5, 15)) == list(range(10, 20))
        assert store.pages_at(v, range(15), again) == {
            **{p: page(p) for p in range(5)},
            **{p: page(100 + p) for p in range(5, 15)},
        }
    finally:
        store.close()


def test_a_slot_taken_again_after_eviction_reads_the_new_row_not_damage(tmp_path):
    store = LocalStore(str(tmp_path))
    try:
        v = store.create_volume("v", 5, 8).row_id  # local LSN 1 is the server's 5: clean
        store.store_fetched(v, [(p, 1, page(p)) for p in range(8)])
        assert store.read_page(v, 5, 1) == (1, page(5))
        old = store._page_rows(v, 5, 1)  # a reader has looked up page 5's row...
        assert old is not None and old[3] is not None
        store.max_bytes = PAGE_SIZE  # ...then eviction frees its slot...
        assert store.maintain(v)["evicted"] == 7
        store.max_bytes = None
        assert store.read_page(v, 5, 1) == (1, None)
        # ...and fetches take the freed slots again, lowest first: page 6 lands in it.
        store.store_fetched(v, [(p, 1, page(p)) for p in (0, 1, 2, 3, 4, 6)])
        assert slot_of(store, v, 6, 1) == old[3]
        # The reader reads the slot: page 6's bytes fail page 5's checksum, so it looks
        # again and finds page 5 evicted (a marker: fetched again), never damage.
        assert store._read_page_row(v, 5, 1, old) == (1, None)
        assert store.read_page(v, 6, 1) == (1, page(6))
        assert [p for p, _, data in store.read_run(v, 0, 8, 1) if data] == [0, 1, 2, 3, 4, 6, 7]
    finally:
        store.close()


@pytest.fixture
def filled(tmp_path):
    """A closed store of 64 pages in the page file; returns ``(cache, v, lsn, pages)``."""
    cache = str(tmp_path / "cache")
    store = LocalStore(cache)
    v = store.create_volume("v", 0, 0).row_id
    pages = {p: page(p) for p in range(64)}
    lsn = store.commit(v, 0, pages, 64)
    store.close()
    return cache, v, lsn, pages


def test_a_truncated_page_file_raises_corrupt_data_for_the_pages_cut(filled):
    cache, v, lsn, pages = filled
    os.truncate(os.path.join(cache, PAGES_FILE), 40 * PAGE_SIZE + 100)
    store = LocalStore(cache)
    try:
        assert store.pages_at(v, range(40), lsn) == {p: pages[p] for p in range(40)}
        for p in (40, 41, 63):
            with pytest.raises(CorruptData, match=f"page {p} of volume .* fails its checksum") as e:
                store.read_page(v, p, lsn)
            assert_names_cache_and_fix(str(e.value), cache)
        assert [p for p, _, _ in store.read_run(v, 36, 8, lsn)] == [36, 37, 38, 39]
        with pytest.raises(CorruptData):
            store.read_run(v, 40, 8, lsn)
    finally:
        store.close()


def test_random_damage_to_the_page_file_never_returns_wrong_data(filled):
    cache, v, lsn, pages = filled
    path = os.path.join(cache, PAGES_FILE)
    with open(path, "rb") as f:
        good = f.read()
    rng = random.Random(11)
    errors = 0
    for _ in range(30):
        with open(path, "r+b") as f:
            for _ in range(4):
                f.seek(rng.randrange(len(good) - 16))
                f.write(rng.randbytes(16))
        store = LocalStore(cache)
        try:
            for p in range(64):
                try:
                    assert store.read_page(v, p, lsn) == (lsn, pages[p])
                except CorruptData as exc:
                    assert_names_cache_and_fix(str(exc), cache)
                    errors += 1
            for first in (0, 32):
                try:
                    run = store.read_run(v, first, 32, lsn)
                except CorruptData:
                    continue
                for p, row_lsn, data in run:
                    assert (row_lsn, data) == (lsn, pages[p])
        finally:
            store.close()
        with open(path, "wb") as f:
            f.write(good)
    assert errors > 0


def test_a_missing_page_file_is_refused_at_open(filled):
    cache, v, lsn, pages = filled
    os.remove(os.path.join(cache, PAGES_FILE))
    with pytest.raises(CorruptData, match="page file .* is missing") as e:
        LocalStore(cache)
    assert_names_cache_and_fix(str(e.value), cache)


def test_a_store_of_the_format_before_the_page_file_is_read_and_upgraded(filled):
    cache, v, lsn, pages = filled
    assert inline_page_data(cache) == 64
    db = apsw.Connection(os.path.join(cache, STORE_FILE))
    assert db.execute("PRAGMA user_version").fetchone() == (3,)
    db.close()

    store = LocalStore(cache)
    try:
        assert store.pages_at(v, range(64), lsn) == pages  # inline, as they were
        new = store.commit(v, lsn, {p: page(1000 + p) for p in range(0, 64, 2)}, 64)
        expected = {p: page(1000 + p) if p % 2 == 0 else pages[p] for p in range(64)}
        assert store.pages_at(v, range(64), new) == expected
        # A run reads both kinds of rows.
        assert {p: data for p, _, data in store.read_run(v, 0, 64, new)} == expected
        rows = store._db.execute(
            "SELECT count(*) FILTER (WHERE slot IS NULL), count(*) FILTER (WHERE slot IS NOT NULL) "
            "FROM pages WHERE lsn=?",
            (new,),
        ).fetchone()
        assert rows == (0, 32)  # the new pages are in the page file
        assert store._scalar("PRAGMA user_version") == FORMAT == 4
    finally:
        store.close()
    assert os.path.getsize(os.path.join(cache, PAGES_FILE)) == 32 * PAGE_SIZE


def test_maintenance_moves_pages_down_and_cuts_the_page_file(tmp_path):
    store = LocalStore(str(tmp_path))
    try:
        v = store.create_volume("v", 0, 0).row_id
        first = store.commit(v, 0, {p: page(p) for p in range(200)}, 200)
        store.record_push(v, first, 1)
        second = store.commit(v, first, {p: page(500 + p) for p in range(200)}, 200)
        # Pushed: the first commit's rows are pruned, freeing slots 0-199 and leaving
        # the second's at 200-399; the pass moves those down and cuts the file.
        store.record_push(v, second, 2)
        assert store._scalar("SELECT count(*) FROM pages") == 200
        assert store._slot_end() == 200
        assert store._scalar("SELECT count(*) FROM free_slots") == 0
        assert os.path.getsize(os.path.join(str(tmp_path), PAGES_FILE)) == 200 * PAGE_SIZE
        assert store.pages_at(v, range(200), second) == {p: page(500 + p) for p in range(200)}
    finally:
        store.close()


def test_durable_commits_sync_the_page_file_and_fetches_do_not(tmp_path, monkeypatch):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(pagefile.os, "fdatasync", lambda fd: synced.append(fd) or real(fd))
    store = LocalStore(str(tmp_path))
    try:
        v = store.create_volume("v", 5, 8).row_id
        synced.clear()
        store.store_fetched(v, [(p, 1, page(p)) for p in range(4)])
        assert synced == []  # fetched pages: written, not synced
        store.set_diverged(v, False)  # a durable commit makes their rows durable: synced
        assert len(synced) == 1
        # Even with nothing written here: another process may have fetched unsynced.
        store.set_diverged(v, False)
        assert len(synced) == 2
        store.store_fetched(v, [(p, 1, page(p)) for p in range(4, 8)])
        assert len(synced) == 2
    finally:
        store.close()  # closing checkpoints the WAL: synced first
    assert len(synced) == 3


def test_the_slot_map_follows_commits_of_this_process_and_of_another(tmp_path):
    """Reads served from the in-memory map of slots are the rows SQL would give."""
    mine, other = LocalStore(str(tmp_path)), LocalStore(str(tmp_path))  # two processes' worth
    try:
        v = mine.create_volume("v", 0, 0).row_id
        first = mine.commit(v, 0, {p: page(p) for p in range(16)}, 16)
        assert mine.read_run(v, 0, 16, first) == [(p, first, page(p)) for p in range(16)]
        assert set(mine._maps[v].rows) == set(range(16)) and mine._maps[v].known == first
        # This process's commit keeps the map: no SQL needed to read it.
        second = mine.commit(v, first, {3: page(103)}, 16)
        assert mine._maps[v].known == second and mine._maps[v].rows[3][0] == second
        # Another process's commit: the map learns it from the log at the next snapshot.
        third = other.commit(v, second, {4: page(104), 5: page(105)}, 16)
        assert mine.read_page(v, 4, second) == (first, page(4))  # the older snapshot
        assert mine.read_page(v, 4, third) == (third, page(104))
        assert mine.read_page(v, 5, third) == (third, page(105))
        assert mine.read_page(v, 3, third) == (second, page(103))
        assert mine.read_page(v, 3, first) == (first, page(3))  # older than its entry: SQL
        assert [r[:2] for r in mine.read_run(v, 0, 8, third)] == [
            (0, first), (1, first), (2, first), (3, second), (4, third), (5, third),
            (6, first), (7, first),
        ]  # fmt: skip
        # Its eviction and a reuse of the slot: the entry fails its checksum, SQL reads.
        entry = mine._maps[v].rows[7]
        other._db.execute("UPDATE pages SET data=NULL, slot=NULL WHERE v=? AND pageno=7", (v,))
        other._db.execute(
            "UPDATE pages SET slot=? WHERE v=? AND pageno=6 AND lsn=?", (entry[1], v, first)
        )
        other.pagefile.write([entry[1]], [page(6)])
        with pytest.raises(CorruptData, match="page 7 of volume"):  # the marker's crc is off
            mine.read_page(v, 7, third)
        assert 7 not in mine._maps[v].rows
        assert mine.read_page(v, 6, third) == (first, page(6))
    finally:
        mine.close()
        other.close()


def test_fetched_pages_another_process_stored_first_give_their_slots_back(tmp_path):
    store = LocalStore(str(tmp_path))
    try:
        v = store.create_volume("v", 5, 8).row_id
        store.store_fetched(v, [(p, 1, page(p)) for p in range(4)])
        # The same pages again (fetched by two readers at once): rows keep their slots,
        # the new slots go back to free_slots.
        store.store_fetched(v, [(p, 1, page(p)) for p in range(6)])
        assert store._slot_end() == 10
        assert store._scalar("SELECT count(*) FROM free_slots") == 4
        assert store.pages_at(v, range(6), 1) == {p: page(p) for p in range(6)}
        store.store_fetched(v, [(p, 1, page(p)) for p in (6, 7)])  # the freed ones, reused
        assert store._slot_end() == 10
        assert sorted(slot_of(store, v, p, 1) for p in (6, 7)) == [4, 5]
    finally:
        store.close()
