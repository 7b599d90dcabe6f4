"""Page maths and the SQLite header fields that Graft serves from the snapshot."""

from __future__ import annotations

import struct

from graft_vfs.core.errors import UnsupportedDatabase
from graft_vfs.core.ids import PAGE_SIZE

ZERO_PAGE = bytes(PAGE_SIZE)
SQLITE_MAGIC = b"SQLite format 3\x00"

# SQLite rewrites page 1 on every write transaction only to bump the file change
# counter (bytes 24-27) and the version-valid-for number (92-95). Graft serves both
# from the snapshot's LSN instead, so page 1 only counts as changed when something
# else in it changed, and readers never re-fetch it just because of the counter.
CHANGE_COUNTER = slice(24, 28)
VERSION_VALID_FOR = slice(92, 96)

# Bytes 18-19 are the file format write/read versions: 1 for a rollback journal, 2 for
# WAL. A volume has no WAL (a Python VFS has no shared memory), so a page 1 saying 2
# would make every client fail to open it.
FORMAT_VERSIONS = slice(18, 20)
ROLLBACK_FORMAT = b"\x01\x01"
WAL_FORMAT = 2


def with_counter(page1: bytes, counter: int) -> bytes:
    """Page 1 with the change counter and version-valid-for set to ``counter``."""
    if len(page1) < 96:
        return page1
    c = struct.pack(">I", counter & 0xFFFFFFFF)
    return page1[:24] + c + page1[28:92] + c + page1[96:]


def header_page_count(page1: bytes) -> int:
    """The in-header database size (bytes 28-31) of page 1."""
    count: int = struct.unpack_from(">I", page1, 28)[0]
    return count


def same_page1(a: bytes, b: bytes) -> bool:
    """True if two versions of page 1 differ at most in the counter fields."""
    return a[:24] == b[:24] and a[28:92] == b[28:92] and a[96:] == b[96:]


def header_page_size(page1: bytes) -> int:
    """The page size page 1 declares (bytes 16-17; 1 stands for 65536)."""
    (size,) = struct.unpack_from(">H", page1, 16)
    return 65536 if size == 1 else size


def page1_for_commit(page1: bytes) -> bytes:
    """Page 1 as a commit may record it: 4096-byte pages, rollback-journal format.

    Every way a database reaches a volume (SQL, VACUUM, VACUUM INTO, the backup API)
    commits a page 1, so this is where another page size is refused (its pages would
    not line up with the volume's) and WAL format bytes (a backup from a WAL-mode
    file copies them) become the rollback-journal ones. Raises UnsupportedDatabase.
    """
    if not page1.startswith(SQLITE_MAGIC):
        return page1
    page_size = header_page_size(page1)
    if page_size != PAGE_SIZE:
        raise UnsupportedDatabase(
            f"a database with page size {page_size} cannot be written to a volume, which "
            f"uses {PAGE_SIZE}-byte pages: convert the source first (PRAGMA "
            f"page_size={PAGE_SIZE}; VACUUM, in journal_mode=DELETE) and copy it again"
        )
    if WAL_FORMAT in page1[FORMAT_VERSIONS]:
        return page1[: FORMAT_VERSIONS.start] + ROLLBACK_FORMAT + page1[FORMAT_VERSIONS.stop :]
    return page1


def check_database_header(header: bytes, what: str) -> int:
    """Validate a SQLite file header for use as a volume; return its page count.

    Raises UnsupportedDatabase with a message that says how to fix the file.
    """
    if len(header) == 0:
        return 0
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise UnsupportedDatabase(f"{what} is not a SQLite database (bad header)")
    page_size = header_page_size(header)
    if page_size != PAGE_SIZE:
        raise UnsupportedDatabase(
            f"{what} has page size {page_size}, graft volumes use {PAGE_SIZE}: convert it "
            f"with sqlite3 {what!s} \"PRAGMA page_size={PAGE_SIZE}; VACUUM INTO 'new.db'\" "
            "(with journal_mode=DELETE) and import new.db"
        )
    if WAL_FORMAT in header[FORMAT_VERSIONS]:
        raise UnsupportedDatabase(
            f'{what} is in WAL mode: run "PRAGMA wal_checkpoint(TRUNCATE); '
            'PRAGMA journal_mode=DELETE" on it first, then import it'
        )
    return header_page_count(header)
