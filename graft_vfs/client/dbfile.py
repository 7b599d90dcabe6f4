"""Moving whole databases in and out: import a SQLite file as a volume, export a snapshot."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

import apsw

from graft_vfs.client.remote import Remote
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import InvalidRequest, UnsupportedDatabase, VolumeNotFound
from graft_vfs.core.graft import MAX_PAGES_PER_READ
from graft_vfs.core.ids import PAGE_SIZE, validate_volume_id
from graft_vfs.core.pages import check_database_header, with_counter

Progress = Callable[[int], None]


def import_database(
    remote: Remote, path: str, vid: str, *, replace: bool = False, progress: Progress | None = None
) -> int:
    """Commit the SQLite file at ``path`` as volume ``vid``; returns the new LSN.

    Everything is checked before anything is written: the file must be a SQLite
    database with 4096-byte pages, not in WAL mode and without a hot journal. An
    existing volume is refused unless ``replace`` (then the file becomes its next LSN).
    """
    validate_volume_id(vid)
    if not os.path.isfile(path):
        raise InvalidRequest(f"{path} does not exist or is not a file")
    for suffix in ("-wal", "-journal"):
        side = path + suffix
        if os.path.exists(side) and os.path.getsize(side) > 0:
            raise UnsupportedDatabase(
                f"{path} has a non-empty {suffix[1:]} file: open it once with sqlite3 (and for "
                "WAL run PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode=DELETE), then import"
            )
    with open(path, "rb") as f:
        check_database_header(f.read(100), path)
    try:
        snap = remote.snapshot(vid)
        base, identity = snap.lsn, snap.identity
    except VolumeNotFound:
        base, identity = 0, None
    if base and not replace:
        raise InvalidRequest(
            f"volume {vid!r} already exists at LSN {base}; pass --replace to commit the file "
            "as its next version"
        )
    # Hold a read transaction on the file so no writer changes it while it is copied.
    src = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        row = src.execute("PRAGMA page_count").fetchone()
        assert row is not None
        page_count: int = row[0]
        pages: dict[int, bytes] = {}
        with open(path, "rb") as f:
            for pageno in range(page_count):
                data = f.read(PAGE_SIZE)
                if len(data) != PAGE_SIZE:
                    raise UnsupportedDatabase(f"{path} is shorter than its page count says")
                pages[pageno] = data
                if progress is not None and pageno % 256 == 0:
                    progress(min(256, page_count - pageno))
        src.execute("COMMIT")
    finally:
        src.close()
    digest = commit_hash(vid, base, page_count, pages.items())
    # With the identity, --replace never lands on a volume created again meanwhile.
    return remote.commit(vid, base, page_count, pages, digest, identity=identity).lsn


def export_database(
    remote: Remote,
    vid: str,
    path: str,
    *,
    lsn: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> int:
    """Write volume ``vid`` at ``lsn`` (default: latest) to a SQLite file; returns the LSN."""
    validate_volume_id(vid)
    if os.path.exists(path) and not overwrite:
        raise InvalidRequest(f"{path} exists; pass --force to overwrite it")
    tmp = path + ".graft-export"
    with open(tmp, "wb") as f:
        lsn = write_database(remote, vid, f, lsn=lsn, progress=progress)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return lsn


def write_database(
    remote: Remote,
    vid: str,
    out: BinaryIO,
    *,
    lsn: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Write volume ``vid`` at ``lsn`` (default: latest) to a binary stream (a file,
    stdout) as a SQLite database; returns the LSN. Pages are verified as they arrive."""
    validate_volume_id(vid)
    snap = remote.snapshot(vid)
    if lsn is None:
        lsn, page_count = snap.lsn, snap.page_count
    else:
        entry = remote.log_entry(vid, lsn)
        if entry is None:
            raise InvalidRequest(f"volume {vid!r} has no LSN {lsn}")
        page_count = int(entry["page_count"])
    for start in range(0, page_count, MAX_PAGES_PER_READ):
        chunk = range(start, min(start + MAX_PAGES_PER_READ, page_count))
        # Every chunk from the same volume, even if it is created again meanwhile.
        got = remote.read_pages(vid, lsn, chunk, identity=snap.identity)
        for pageno in chunk:
            data = got[pageno][1]
            out.write(with_counter(data, lsn) if pageno == 0 else data)
        if progress is not None:
            progress(len(chunk))
    return lsn
