"""Page maths and the SQLite header fields that Graft serves from the snapshot."""

from __future__ import annotations

import struct

from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.errors import UnsupportedDatabase

ZERO_PAGE = bytes(PAGE_SIZE)
SQLITE_MAGIC = b"SQLite format 3\x00"

# SQLite rewrites page 1 on every write transaction only to bump the file change
# counter (bytes 24-27) and the version-valid-for number (92-95). Graft serves both
# from the snapshot's LSN instead, so page 1 only counts as changed when something
# else in it changed, and readers never re-fetch it just because of the counter.
CHANGE_COUNTER = slice(24, 28)
VERSION_VALID_FOR = slice(92, 96)


def with_counter(page1: bytes, counter: int) -> bytes:
    """Page 1 with the change counter and version-valid-for set to ``counter``."""
    if len(page1) < 96:
        return page1
    c = struct.pack(">I", counter & 0xFFFFFFFF)
    return page1[:24] + c + page1[28:92] + c + page1[96:]


def header_page_count(page1: bytes) -> int:
    """The in-header database size (bytes 28-31) of page 1."""
    return struct.unpack_from(">I", page1, 28)[0]


def same_page1(a: bytes, b: bytes) -> bool:
    """True if two versions of page 1 differ at most in the counter fields."""
    return a[:24] == b[:24] and a[28:92] == b[28:92] and a[96:] == b[96:]


def check_database_header(header: bytes, what: str) -> int:
    """Validate a SQLite file header for use as a volume; return its page count.

    Raises UnsupportedDatabase with a message that says how to fix the file.
    """
    if len(header) == 0:
        return 0
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise UnsupportedDatabase(f"{what} is not a SQLite database (bad header)")
    (page_size,) = struct.unpack(">H", header[16:18])
    if page_size == 1:
        page_size = 65536
    if page_size != PAGE_SIZE:
        raise UnsupportedDatabase(
            f"{what} has page size {page_size}, graft volumes use {PAGE_SIZE}: convert it "
            f"with sqlite3 {what!s} \"PRAGMA page_size={PAGE_SIZE}; VACUUM INTO 'new.db'\" "
            "(with journal_mode=DELETE) and import new.db"
        )
    if header[18] == 2 or header[19] == 2:
        raise UnsupportedDatabase(
            f'{what} is in WAL mode: run "PRAGMA wal_checkpoint(TRUNCATE); '
            'PRAGMA journal_mode=DELETE" on it first, then import it'
        )
    return header_page_count(header)
