"""The local store's SQLite file: its rows' checksums, and verified reads and writes of them.

Every row carries a CRC-32 of its key and contents (``crc``), checked whenever the row
is read; together with SQLite's own checks of its file structure, a cache damaged on
disk raises ``CorruptData`` naming the file and the fix (delete the cache directory: the
next client rebuilds it from the server) instead of returning wrong data. Errors of the
underlying SQLite file (apsw exceptions) become graft errors here, once, naming the file
(``_boundary``). ``StoreFile`` is the base of ``local.LocalStore`` (through
``maintenance.Maintenance``): the connection, its lock, its transactions and its rows.

Page data. A page row names a slot of the page file (``pagefile``) for its 4 KiB of data
(``slot``, with an empty ``data``), or holds its data inline (rows written before the
page file, and pages of another size), or is a marker (no data, no slot). Slots are
taken from ``free_slots`` or past the end of the file (the ``page_file`` row) inside the
transaction that inserts their rows, and go back to ``free_slots`` (triggers) in the
transaction that drops or empties their rows; a slot is never taken in the transaction
that frees it, so a reader that finds another page's bytes in a slot finds the row
changed when it looks again (``_page_rows``). The page file is synced before every
durable commit, so no durable row names bytes that are not.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar, cast

import apsw

from graft_vfs.client.pagefile import PageFile
from graft_vfs.client.sharing import ChangeSignal
from graft_vfs.core.errors import Busy, CorruptData, GraftError, StorageError
from graft_vfs.core.ids import PAGE_SIZE

BUSY_TIMEOUT_MS = 10_000  # how long a write waits for another process's write

_KEY3 = struct.Struct("<qqq")
_KEY4 = struct.Struct("<qqqq")
_VOLUME_KEY = struct.Struct("<qqqqq")
SLOT_RETRIES = 8  # a page read whose row keeps changing under it (evicted, fetched again)
_CHECK_ERRORS = (TypeError, ValueError, OverflowError, struct.error)  # a damaged value's type


def _page_crc(v: int, pageno: int, lsn: int, data: bytes | None) -> int:
    crc = zlib.crc32(_KEY3.pack(v, pageno, lsn))
    return crc if data is None else zlib.crc32(data, crc ^ 1)


def _slots_crc(slots: int) -> int:
    return zlib.crc32(_KEY3.pack(0, slots, 4))


def _log_crc(v: int, lsn: int, page_count: int, remote_lsn: int | None, pages: bytes) -> int:
    key = _KEY4.pack(v, lsn, page_count, -1 if remote_lsn is None else remote_lsn)
    return zlib.crc32(pages, zlib.crc32(key))


def _volume_crc(
    row_id: int,
    vid: str,
    local_lsn: int,
    sync_lsn: int,
    remote_lsn: int,
    diverged: int,
    intent: bytes | None,
) -> int:
    key = _VOLUME_KEY.pack(row_id, local_lsn, sync_lsn, remote_lsn, diverged)
    crc = zlib.crc32(vid.encode(), zlib.crc32(key))
    return crc if intent is None else zlib.crc32(intent, crc ^ 1)


def _origin_crc(v: int, store_id: bytes, volume_id: bytes, since_lsn: int) -> int:
    return zlib.crc32(store_id + volume_id, zlib.crc32(_KEY3.pack(v, since_lsn, 2)))


def _matches(crc_of: Callable[..., int], stored: object, *fields: Any) -> bool:
    """Whether a row read back has the crc it was written with."""
    try:
        return crc_of(*fields) == stored
    except _CHECK_ERRORS:
        return False


F = TypeVar("F", bound=Callable[..., Any])


def _boundary(fn: F) -> F:
    """Errors of the store's SQLite file (apsw exceptions) become graft errors, once."""

    @functools.wraps(fn)
    def wrapper(self: StoreFile, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise self._error(exc) from exc

    return wrapper  # type: ignore[return-value]


# A volume row as stored: (row id, name, local, sync and remote LSN, diverged, intent).
VolumeFields = tuple[int, str, int, int, int, int, bytes | None]


class StoreFile:
    """The store's SQLite connection and its verified rows (the base of ``LocalStore``)."""

    path: str
    cache_dir: str
    signal: ChangeSignal
    pagefile: PageFile
    _db: apsw.Connection
    _lock: threading.RLock
    _identity: tuple[int, int] | None

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _error(self, exc: BaseException) -> GraftError:
        """The graft error for an error of the store's SQLite file."""
        if isinstance(exc, (apsw.CorruptError, apsw.NotADBError, UnicodeDecodeError)):
            return self._corrupt(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, apsw.BusyError):
            return Busy(f"the local cache {self.path} is locked by another process: {exc}")
        return StorageError(f"the local cache {self.path} failed: {type(exc).__name__}: {exc}")

    def _corrupt(self, what: str) -> CorruptData:
        return CorruptData(
            f"the local cache {self.path} is damaged ({what}), so nothing is read from it; "
            f"to rebuild it, stop the clients using it and delete the directory "
            f"{self.cache_dir}: the next client fetches what it needs from the server "
            "(local commits not pushed yet are lost with it)"
        )

    def _check_not_deleted(self, doing: str = "a commit here would not be durable") -> None:
        """Refuse to write a commit that would not be durable (the file is gone)."""
        if self._file_identity() != self._identity:
            raise StorageError(
                f"the local cache {self.path} was deleted or replaced while this client was "
                f"running, so {doing}: refused. What it held is still readable, and local "
                "commits not pushed yet can still be pushed, until the client closes; then "
                "open a new client (graft_vfs.unregister() or a new process), which rebuilds "
                "the cache from the server"
            )

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[None]:
        """A write transaction, taking SQLite's write lock first (waiting for other processes).

        Taken up front, a read-modify-write never fails to upgrade its read lock because
        another process wrote in between (SQLITE_BUSY_SNAPSHOT in WAL mode). It is on
        disk when this returns (``synchronous=FULL``), unless not ``durable``: then the
        WAL is not synced for it (``synchronous=NORMAL``), for what can be fetched again.
        A crash may lose such a transaction, never a durable one after it (syncing the
        WAL syncs everything before), and never half of one (WAL frames are checksummed).
        """
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    if durable:
                        # Data before the rows that name it: syncing the WAL makes every
                        # earlier row durable too, fetched pages' rows of any process
                        # included (written before this transaction took the write lock).
                        self.pagefile.sync(shared=True)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        with suppress(apsw.Error):
                            self._db.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
            self._committed()

    def _committed(self) -> None:
        """Called after each write transaction of ``_write`` commits (holding the lock)."""

    @contextmanager
    def _change(self) -> Iterator[None]:
        """A write transaction on the store, signalled to other processes once committed."""
        with self._lock:
            with self._write():
                yield
            self.signal.bump()

    # -- verified reads and writes of rows ---------------------------------------------

    def _scalar(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        """The first value of the first row of ``sql`` (a PRAGMA, an aggregate)."""
        row = self._db.execute(sql, args).fetchone()
        assert row is not None
        return row[0]

    def _volume_fields(self, column: str, value: object) -> VolumeFields | None:
        """The volume row ``(id, vid, local, sync, remote, diverged, intent)``, verified."""
        row = self._db.execute(
            "SELECT id, vid, local_lsn, sync_lsn, remote_lsn, diverged, push_intent, crc "
            f"FROM volumes WHERE {column}=?",
            (value,),
        ).fetchone()
        if row is None:
            return None
        if not _matches(_volume_crc, row[7], *row[:7]):
            raise self._corrupt(f"the row of volume {row[1]!r} fails its checksum")
        return cast(VolumeFields, tuple(row[:7]))

    def _volume_by_id(self, v: int) -> VolumeFields:
        row = self._volume_fields("id", v)
        if row is None:
            raise self._corrupt(f"volume {v} has no row")
        return row

    def _update_volume(self, v: int, **changes: Any) -> None:
        """Rewrite volume ``v``'s row with ``changes`` and a fresh crc."""
        row_id, vid, local_lsn, sync_lsn, remote_lsn, diverged, intent = self._volume_by_id(v)
        local_lsn = changes.pop("local_lsn", local_lsn)
        sync_lsn = changes.pop("sync_lsn", sync_lsn)
        remote_lsn = changes.pop("remote_lsn", remote_lsn)
        diverged = changes.pop("diverged", diverged)
        intent = changes.pop("push_intent", intent)
        assert not changes, changes
        crc = _volume_crc(row_id, vid, local_lsn, sync_lsn, remote_lsn, diverged, intent)
        self._db.execute(
            "UPDATE volumes SET local_lsn=?, sync_lsn=?, remote_lsn=?, diverged=?, "
            "push_intent=?, crc=? WHERE id=?",
            (local_lsn, sync_lsn, remote_lsn, diverged, intent, crc, v),
        )

    def _log_rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Log rows ``(v, lsn, page_count, remote_lsn, pages)`` selected by ``sql``, verified."""
        out = []
        for row in self._db.execute(
            f"SELECT v, lsn, page_count, remote_lsn, pages, crc FROM log WHERE {sql}", args
        ):
            if not _matches(_log_crc, row[5], *row[:5]):
                raise self._corrupt(f"the log row of local LSN {row[1]} fails its checksum")
            out.append(row[:5])
        return out

    def _log_start(self, v: int) -> int:
        return int(self._scalar("SELECT min(lsn) FROM log WHERE v=?", (v,)) or 0)

    def _insert_log(
        self, v: int, lsn: int, page_count: int, remote_lsn: int | None, pages: bytes
    ) -> None:
        crc = _log_crc(v, lsn, page_count, remote_lsn, pages)
        self._db.execute(
            "INSERT INTO log(v, lsn, page_count, remote_lsn, pages, crc) VALUES(?,?,?,?,?,?)",
            (v, lsn, page_count, remote_lsn, pages, crc),
        )

    def _insert_pages(self, v: int, lsn: int, pages: Iterable[tuple[int, bytes | None]]) -> None:
        """Insert page rows at ``lsn``, their data written to slots of the page file."""
        values, _ = self._page_values(v, [(p, lsn, data) for p, data in pages])
        self._db.executemany(
            "INSERT INTO pages(v, pageno, lsn, data, slot, crc, used) VALUES(?,?,?,?,?,?,?)",
            values,
        )

    def _page_values(
        self, v: int, rows: Sequence[tuple[int, int, bytes | None]]
    ) -> tuple[list[tuple[Any, ...]], dict[int, int]]:
        """The ``pages`` values of rows ``(pageno, lsn, data|None)``, each whole page's
        data written to a slot of the page file first (its row names the slot and keeps
        an empty data); and the slots taken, by the row's index."""
        now = time.time_ns()
        full = [
            i for i, (_, _, data) in enumerate(rows) if data is not None and len(data) == PAGE_SIZE
        ]
        slots: dict[int, int] = {}
        if full:
            taken = self._take_slots(len(full))
            self.pagefile.write(taken, [cast(bytes, rows[i][2]) for i in full])
            slots = dict(zip(full, taken, strict=True))
        values = [
            (
                v,
                p,
                lsn,
                b"" if i in slots else data,
                slots.get(i),
                _page_crc(v, p, lsn, data),
                now,
            )
            for i, (p, lsn, data) in enumerate(rows)
        ]
        return values, slots

    # -- the page file's slots -----------------------------------------------------------

    def _slot_end(self) -> int:
        """Slots the page file has (taken or free), from its verified ``page_file`` row."""
        row = self._db.execute("SELECT slots, crc FROM page_file WHERE id=0").fetchone()
        if row is None or not _matches(_slots_crc, row[1], row[0]):
            raise self._corrupt("the row of the page file's size is missing or fails its checksum")
        return int(row[0])

    def _set_slot_end(self, slots: int) -> None:
        self._db.execute(
            "UPDATE page_file SET slots=?, crc=? WHERE id=0", (slots, _slots_crc(slots))
        )

    def _take_slots(self, count: int) -> list[int]:
        """``count`` free slots, lowest first, then new ones at the end (in a write transaction).

        Taken in the transaction that inserts the rows naming them: a crash before its
        commit leaves them free. Slots in ``free_slots`` were freed by transactions that
        committed (no transaction both frees and takes), which readers rely on.
        """
        taken = sorted(
            s
            for (s,) in self._db.execute(
                "DELETE FROM free_slots WHERE slot IN "
                "(SELECT slot FROM free_slots ORDER BY slot LIMIT ?) RETURNING slot",
                (count,),
            )
        )
        if len(taken) < count:
            end = self._slot_end()
            new_end = end + count - len(taken)
            taken.extend(range(end, new_end))
            self._set_slot_end(new_end)
        return taken

    def _give_back_slots(self, slots: Iterable[int]) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO free_slots(slot) VALUES(?)", ((s,) for s in slots)
        )

    def _page_bytes(self, v: int, pageno: int, row: tuple[Any, ...]) -> bytes | None:
        """The data of the page row ``(lsn, data, crc, slot)`` if it matches its checksum.

        None if it does not: damage, or (a slot) the row was dropped and its slot taken
        again since the row was read; ``_page_rows`` tells which by looking again.
        """
        row_lsn, data, crc, slot = row
        if slot is not None:
            try:
                data = self.pagefile.read(slot)
            except (OSError, OverflowError, TypeError, ValueError):
                return None
        return data if _matches(_page_crc, crc, v, pageno, row_lsn, data) else None

    def _page_rows(self, v: int, pageno: int, lsn: int) -> tuple[Any, ...] | None:
        """The latest row ``(lsn, data, crc, slot)`` of ``pageno`` at or before ``lsn``."""
        with self._lock:
            return cast(
                "tuple[Any, ...] | None",
                self._db.execute(
                    "SELECT lsn, data, crc, slot FROM pages WHERE v=? AND pageno=? AND lsn<=? "
                    "ORDER BY lsn DESC LIMIT 1",
                    (v, pageno, lsn),
                ).fetchone(),
            )

    def _read_page_row(
        self, v: int, pageno: int, lsn: int, row: tuple[Any, ...] | None = None
    ) -> tuple[int, bytes | None] | None:
        """The latest row of ``pageno`` at or before ``lsn``, verified: ``(row_lsn, data|None)``.

        ``row``, if given, is that row as read already. A slot whose bytes fail the
        checksum is looked up again: if the row changed meanwhile (evicted or pruned, its
        slot taken again), the new row is read; if not, the page is damaged.
        """
        if row is None:
            row = self._page_rows(v, pageno, lsn)
        for _ in range(SLOT_RETRIES):
            if row is None:
                return None
            if row[1] is None and row[3] is None:
                if not _matches(_page_crc, row[2], v, pageno, row[0], None):
                    break
                return row[0], None
            data = self._page_bytes(v, pageno, row)
            if data is not None:
                return row[0], data
            if row[3] is None:
                break
            again = self._page_rows(v, pageno, lsn)
            if again == row:
                break
            row = again
        raise self._corrupt(f"page {pageno} of volume {v} fails its checksum")
