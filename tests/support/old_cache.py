"""Caches as older graft_vfs versions left them, made from a closed cache of this one."""

from __future__ import annotations

import os

import apsw

from graft_vfs.client.local import STORE_FILE
from graft_vfs.client.pagefile import PAGES_FILE
from graft_vfs.core.ids import PAGE_SIZE


def inline_page_data(cache: str) -> int:
    """Turn a closed cache into format 3: every page's data inline in its row, no page file.

    Returns how many rows had their data moved back into the store file.
    """
    path = os.path.join(cache, STORE_FILE)
    with open(os.path.join(cache, PAGES_FILE), "rb") as f:
        page_file = f.read()
    db = apsw.Connection(path)
    try:
        rows = db.execute(
            "SELECT v, pageno, lsn, slot FROM pages WHERE slot IS NOT NULL"
        ).fetchall()
        with db:
            db.execute("DROP TRIGGER pages_slot_dropped")
            db.execute("DROP TRIGGER pages_slot_emptied")
            db.executemany(
                "UPDATE pages SET data=? WHERE v=? AND pageno=? AND lsn=?",
                (
                    (page_file[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE], v, pageno, lsn)
                    for v, pageno, lsn, slot in rows
                ),
            )
            db.execute("ALTER TABLE pages DROP COLUMN slot")
            db.execute("DROP TABLE free_slots")
            db.execute("DROP TABLE page_file")
            db.execute("PRAGMA user_version=3")
    finally:
        db.close()
    os.remove(os.path.join(cache, PAGES_FILE))
    return len(rows)
