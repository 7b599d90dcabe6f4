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


# Page 1's header fields as a rebase merges them (offset, size, name). The change
# counter and version-valid-for (served from the LSN anyway) and the SQLite version
# that last wrote the file merge freely; every other field may change on one side only.
_PAGE1_FIELDS = (
    (28, 4, "page count"),
    (32, 8, "freelist"),  # first trunk page and free page count, one field
    (40, 4, "schema cookie"),
    (44, 4, "schema format"),
    (48, 4, "default cache size"),
    (52, 4, "largest root page (auto-vacuum)"),
    (56, 4, "text encoding"),
    (60, 4, "user version"),
    (64, 4, "incremental vacuum"),
    (68, 4, "application id"),
)
_FREE_MERGE = ((24, 4), (92, 8))  # change counter; version-valid-for and SQLite version


class Page1Conflict(Exception):
    """Both sides changed a field of page 1 that cannot merge (its message says which)."""


def merge_page1(base: bytes, local: bytes, remote: bytes) -> bytes:
    """Page 1 with ``local``'s changes since ``base`` applied over ``remote``'s.

    A field changed on one side only takes that side's value. Raises Page1Conflict
    when both sides changed the page count (both grew or shrank the file), the
    freelist, or any other header field, when the remote side changed the schema
    cookie (the local transactions were planned against the old schema: a new index
    would miss their rows), or when both changed the schema table's part of page 1
    (bytes 100 on).
    """
    for page in (base, local, remote):
        if len(page) != PAGE_SIZE or not page.startswith(SQLITE_MAGIC):
            raise Page1Conflict("page 1 is not a SQLite header page on every side")
    out = bytearray(remote)
    for offset, size, name in _PAGE1_FIELDS:
        field = slice(offset, offset + size)
        mine, theirs, was = local[field], remote[field], base[field]
        if name == "schema cookie" and theirs != was:
            raise Page1Conflict("the schema changed remotely (schema cookie)")
        if mine == was:
            continue
        if theirs != was and (theirs != mine or name in ("page count", "freelist")):
            # Both grew the file (the same new pages) or both used the freelist.
            raise Page1Conflict(f"both sides changed the {name} of page 1")
        out[field] = mine
    if base[:24] != local[:24] or base[:24] != remote[:24]:
        raise Page1Conflict("the first 24 bytes of page 1 changed")
    body = slice(100, PAGE_SIZE)
    if local[body] != base[body]:
        if remote[body] != base[body] and remote[body] != local[body]:
            raise Page1Conflict("both sides changed the schema table's part of page 1")
        out[body] = local[body]
    for offset, size in _FREE_MERGE:
        out[offset : offset + size] = remote[offset : offset + size]
    merged = bytes(out)
    if header_page_count(merged) < max(header_page_count(local), header_page_count(remote)):
        raise Page1Conflict("the merged page count would cut off pages")  # (a shrink)
    return merged
