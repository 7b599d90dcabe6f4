"""The durable local store: volumes' local logs and cached pages in one SQLite file.

It is an ordinary SQLite database on the default VFS in WAL mode with
``synchronous=FULL``: a local commit is on disk before SQLite is told it succeeded.

Each volume has its own *local* LSN sequence. A local LSN is either a local commit
(pages written here) or a pull (pages changed on the server, recorded as markers with
no data until read). ``sync_lsn`` is the local LSN whose content equals the server's
``remote_lsn``; local commits after it are pending push. A page row ``(page, lsn)``
holds the page's content from local LSN ``lsn`` until the next row of that page, so
reading a page at snapshot S is "the latest row at or before S"; a row with NULL data
is a page known to have changed whose content has not been fetched yet.

Size. Maintenance (after pushes, pulls and resets, and after fetches when the cache has
a size limit) keeps only the versions a live snapshot can still read: below the
volume's *floor*, the latest sync point at or before both ``sync_lsn`` and the oldest
snapshot any process sharing the directory has pinned (``PinTable``), each page keeps
its latest row and the log keeps nothing. Over the size limit, clean pages (rows at or
before the floor, which the server can give back) become markers again, least recently
used first; unpushed rows are never touched. Freed file pages go back to the file system
with ``PRAGMA incremental_vacuum``. Each pass does a bounded amount of work.

Damage. Every row carries a CRC-32 of its key and contents (``crc``), checked whenever
the row is read; together with SQLite's own checks of its file structure, a cache
damaged on disk raises ``CorruptData`` naming the file and the fix (delete the cache
directory: the next client rebuilds it from the server) instead of returning wrong
data. A cache file deleted or replaced under a running client keeps working for reads,
pushes and pulls (Linux keeps the open file), but a local commit is refused: it would
vanish with the process. Errors of the underlying SQLite file (apsw exceptions) become
graft errors here, once, naming the file.

Identity. ``origins`` records, per volume, the identity (``core.identity``) of the
server's volume its pages came from and the first local LSN they came from it, so a
cache never mixes pages of two incarnations of one volume name.
"""

from __future__ import annotations

import fcntl
import functools
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import apsw
import msgpack
from pyroaring import BitMap

from graft_vfs.core.errors import (
    Busy,
    CorruptData,
    Diverged,
    GraftError,
    SnapshotExpired,
    StorageError,
)
from graft_vfs.core.faults import crash_point
from graft_vfs.core.graft import decode_graft, encode_graft
from graft_vfs.core.identity import Identity
from graft_vfs.core.ids import PAGE_SIZE

STORE_FILE = "graft-cache.db"
SIGNAL_FILE = "graft-cache.signal"
PINS_FILE = "graft-cache.pins"
LOCK_DIR = "locks"

BUSY_TIMEOUT_MS = 10_000  # how long a write waits for another process's write
WAL_KEEP_BYTES = 1 << 20  # the -wal file is cut back to this after a checkpoint
PIN_SLOTS = 4096  # connections open at once, over all processes sharing a cache directory
NO_PIN = 2**64 - 1
PRUNE_BATCH_PAGES = 4096  # distinct pages one maintenance pass prunes old versions of
EVICT_BATCH_PAGES = 4096  # pages one maintenance pass evicts
VACUUM_BATCH_PAGES = 4096  # free file pages one maintenance pass returns to the file system
USAGE_LOG = 4096  # page reads from the cache file remembered for eviction order
EVICT_CHECKS = 16  # eviction passes while fetches fill a cache of the limit's size

# PRAGMA user_version of the store. 0: the first format; 1: every row has a crc;
# 2: the origins table (the identity of each volume's server side).
FORMAT = 2

_SCHEMA = """
CREATE TABLE volumes(
    id INTEGER PRIMARY KEY,
    vid TEXT UNIQUE NOT NULL,
    local_lsn INTEGER NOT NULL,
    sync_lsn INTEGER NOT NULL,
    remote_lsn INTEGER NOT NULL,
    diverged INTEGER NOT NULL DEFAULT 0,
    push_intent BLOB,
    crc INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE log(
    v INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    page_count INTEGER NOT NULL,
    remote_lsn INTEGER,
    pages BLOB NOT NULL,
    crc INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(v, lsn)
) WITHOUT ROWID;
CREATE TABLE pages(
    v INTEGER NOT NULL,
    pageno INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    data BLOB,
    crc INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(v, pageno, lsn)
) WITHOUT ROWID;
"""

_ORIGINS = """
CREATE TABLE IF NOT EXISTS origins(
    v INTEGER PRIMARY KEY,
    store_id BLOB NOT NULL,
    volume_id BLOB NOT NULL,
    since_lsn INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
"""

# Format 0 -> 1: add the crc columns, then fill them (functions registered at open).
_MIGRATE_0 = """
ALTER TABLE volumes ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
ALTER TABLE log ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pages ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
UPDATE volumes SET crc = graft_volume_crc(id, vid, local_lsn, sync_lsn, remote_lsn, diverged,
                                          push_intent);
UPDATE log SET crc = graft_log_crc(v, lsn, page_count, remote_lsn, pages);
UPDATE pages SET crc = graft_page_crc(v, pageno, lsn, data);
"""

# Added to stores of any format when missing: eviction order (ns since the epoch of the
# last read or write of the row; a damaged value only changes what is evicted first).
_ADD_USED = "ALTER TABLE pages ADD COLUMN used INTEGER NOT NULL DEFAULT 0"

_KEY3 = struct.Struct("<qqq")
_KEY4 = struct.Struct("<qqqq")
_VOLUME_KEY = struct.Struct("<qqqqq")
_CHECK_ERRORS = (TypeError, ValueError, OverflowError, struct.error)  # a damaged value's type


def _page_crc(v: int, pageno: int, lsn: int, data: bytes | None) -> int:
    crc = zlib.crc32(_KEY3.pack(v, pageno, lsn))
    return crc if data is None else zlib.crc32(data, crc ^ 1)


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
    def wrapper(self: LocalStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise self._error(exc) from exc

    return wrapper  # type: ignore[return-value]


@dataclass
class VolumeRow:
    """A volume's sync state as stored."""

    row_id: int  # the key of its rows in the local store
    vid: str
    local_lsn: int
    sync_lsn: int
    remote_lsn: int
    diverged: bool
    push_intent: dict[str, Any] | None
    page_count: int  # at local_lsn
    identity: Identity | None = None  # the server's volume; None until known
    identity_lsn: int = 0  # the first local LSN whose pages came from that volume

    @property
    def pending(self) -> int:
        """Local LSNs not yet pushed."""
        return self.local_lsn - self.sync_lsn


# A volume row as stored: (row id, name, local, sync and remote LSN, diverged, intent).
VolumeFields = tuple[int, str, int, int, int, int, bytes | None]


@dataclass(frozen=True)
class PushIntent:
    """A push in flight, recorded before it is sent so a crash can resolve it."""

    local_lsn: int
    base: int
    hash: bytes


class ChangeSignal:
    """Eight shared bytes that change whenever any process changes the local store.

    Processes sharing a cache directory map the same small file; after each change
    to the store (and after its SQLite commit), the writer stores a fresh random
    value there. A reader compares it with the value it saw last, which costs one
    memory read: that keeps the per-transaction hot path free of system calls
    while several processes share one cache.
    """

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def value(self) -> int:
        return int(struct.unpack_from("<Q", self._map)[0])

    def bump(self) -> None:
        # A fresh random value rather than an increment: two writers racing on a
        # read-modify-write could leave the value one reader already saw.
        self._map[:8] = os.urandom(8)

    def close(self) -> None:
        self._map.close()


class WriterLock:
    """The cross-process half of a volume's writer lock: flock on a file per volume."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


_SLOT = struct.Struct("<QQ")  # volume id + 1 (0: free), pinned local LSN (NO_PIN: none)
_SIGNAL = struct.Struct("<Q")


class PinSlot:
    """One reader's entry in the pin table (a connection, or a hydrate in progress)."""

    def __init__(self, table: PinTable, index: int, fd: int) -> None:
        self.index = index
        self.fd = fd
        self._map = table.map
        self._offset = 8 + index * _SLOT.size
        self._fence = threading.Lock()
        self.unpin()

    def pin(self, v: int, lsn: int) -> int:
        """Publish that this reader reads ``lsn`` of volume ``v``; returns the prune signal.

        The signal is read after the pin is written, with a lock released in between:
        a locked instruction, so a full barrier on x86-64.
        """
        with self._fence:
            _SLOT.pack_into(self._map, self._offset, v + 1, lsn)
        return int(_SIGNAL.unpack_from(self._map)[0])

    def unpin(self) -> None:
        _SLOT.pack_into(self._map, self._offset, 0, NO_PIN)


class PinTable:
    """The snapshots that readers in every process sharing a cache directory still read.

    A shared memory map: eight bytes of *prune signal*, then one slot per reader (a
    connection) holding the local LSN its transaction reads. A slot belongs to whoever
    holds the flock of its lock file, so the slot of a process that died is ignored.
    Maintenance and readers follow a hazard-pointer protocol: a reader writes its pin,
    then reads the signal; maintenance changes the signal (holding the store's write
    lock), then reads the pins. So either maintenance sees the pin, or the reader sees a
    new signal and checks its snapshot once the maintenance has committed. Both sides
    take a lock between their write and their read, a full barrier on x86-64, so
    neither can miss the other. Pinning is two memory accesses and a lock: the
    per-transaction hot path stays free of system calls.
    """

    def __init__(self, path: str, lock_dir: str) -> None:
        size = 8 + PIN_SLOTS * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._lock_dir = lock_dir
        self._fence = threading.Lock()
        # Reentrant: a connection collected (and its slot given back) while taking one.
        self._lock = threading.RLock()
        self._spare: list[PinSlot] = []  # slots this process owns and does not use now
        self._owned: list[PinSlot] = []

    def _lock_path(self, index: int) -> str:
        return os.path.join(self._lock_dir, f"pin-{index}.lock")

    def take(self) -> PinSlot:
        """A free slot, owned by this process until it gives it back or ends."""
        with self._lock:
            if self._spare:
                return self._spare.pop()
            taken = {slot.index for slot in self._owned}
        for index in range(PIN_SLOTS):
            if index in taken:
                continue
            fd = os.open(self._lock_path(index), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            slot = PinSlot(self, index, fd)
            with self._lock:
                self._owned.append(slot)
            return slot
        raise StorageError(
            f"more than {PIN_SLOTS} connections are open on one cache directory at once: "
            "close some, or give some processes a cache directory of their own"
        )

    def give(self, slot: PinSlot) -> None:
        with self._lock:
            if slot in self._owned:  # not closed since
                slot.unpin()
                self._spare.append(slot)

    def bump(self) -> None:
        # Random like ChangeSignal: racing read-modify-writes cannot restore a seen value.
        self.map[:8] = os.urandom(8)

    def lowest(self, v: int) -> int | None:
        """The lowest local LSN of volume ``v`` pinned by a live process, after a barrier."""
        with self._fence:
            slots = bytes(self.map[8:])
        low = NO_PIN
        for index, (vid, lsn) in enumerate(_SLOT.iter_unpack(slots)):
            if vid == v + 1 and lsn < low and self._alive(index):
                low = lsn
        return None if low == NO_PIN else low

    def _alive(self, index: int) -> bool:
        try:
            fd = os.open(self._lock_path(index), os.O_RDWR)
        except FileNotFoundError:
            return True  # deleted behind its owner's back: keep its pin, to be safe
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False  # its process ended without clearing the slot

    def close(self) -> None:
        with self._lock:
            owned, self._owned, self._spare = self._owned, [], []
        for slot in owned:
            slot.unpin()
            os.close(slot.fd)  # and so its flock
        self.map.close()


class LocalStore:
    """One cache directory's durable store; thread-safe, and shareable by processes."""

    def __init__(self, cache_dir: str, max_bytes: int | None = None) -> None:
        self.cache_dir = cache_dir
        self.path = os.path.join(cache_dir, STORE_FILE)
        self.max_bytes = max_bytes  # page data kept at most (None: no limit)
        try:
            os.makedirs(os.path.join(cache_dir, LOCK_DIR), exist_ok=True)
            self.signal = ChangeSignal(os.path.join(cache_dir, SIGNAL_FILE))
            self.pins = PinTable(
                os.path.join(cache_dir, PINS_FILE), os.path.join(cache_dir, LOCK_DIR)
            )
        except OSError as exc:
            raise StorageError(f"cannot create the local cache {cache_dir}: {exc}") from exc
        self._lock = threading.RLock()
        self._usage: dict[int, Callable[[], list[tuple[int, int, int]]]] = {}
        self._fetched = 0  # pages fetched since the last eviction pass
        try:
            self._db = apsw.Connection(self.path)
        except apsw.Error as exc:
            self.signal.close()
            self.pins.close()
            raise StorageError(f"cannot open the local cache {self.path}: {exc}") from exc
        try:
            self._db.set_busy_timeout(BUSY_TIMEOUT_MS)
            # Only a new file takes this (before its first table); see _reclaim_space.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL").fetchall()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}").fetchall()
            self._prepare()
            self._prepare_maintenance()
            self._identity = self._file_identity()
        except BaseException as exc:
            self._db.close()
            self.signal.close()
            self.pins.close()
            if isinstance(exc, (apsw.Error, UnicodeDecodeError)):
                raise self._error(exc) from exc
            raise

    def _prepare(self) -> None:
        """Create the schema in a new store; bring an older store to the current format."""
        version = self._scalar("PRAGMA user_version")
        if version == FORMAT:
            return
        with self._write():
            version = self._scalar("PRAGMA user_version")
            tables = self._scalar(
                "SELECT count(*) FROM sqlite_schema WHERE name IN ('volumes', 'log', 'pages')"
            )
            if version == 0 and tables == 0:
                self._db.execute(_SCHEMA + _ORIGINS)
            elif version in (0, 1) and tables == 3:
                if version == 0:
                    crcs: tuple[tuple[str, Callable[..., int]], ...] = (
                        ("graft_volume_crc", _volume_crc),
                        ("graft_log_crc", _log_crc),
                        ("graft_page_crc", _page_crc),
                    )
                    for name, fn in crcs:
                        self._db.create_scalar_function(name, fn, deterministic=True)
                    self._db.execute(_MIGRATE_0)
                # Volumes of an older cache have no identity yet: each takes the one of
                # its server's volume at its first contact (see sync.Sync.reconcile).
                self._db.execute(_ORIGINS)
            elif version != FORMAT:
                raise StorageError(
                    f"the local cache {self.path} has format {version} (tables: {tables}), "
                    f"which this graft_vfs (format {FORMAT}) does not know: use the graft_vfs "
                    f"that made it, or delete the directory {self.cache_dir} to rebuild it "
                    "from the server (local commits not pushed yet are lost with it)"
                )
            self._db.execute(f"PRAGMA user_version={FORMAT}")

    def _prepare_maintenance(self) -> None:
        """Give a store made before maintenance existed its eviction column and vacuum mode.

        Neither changes what older graft_vfs versions read, so the format stays.
        """
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(pages)")}
        if "used" not in columns:
            with self._write():
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(pages)")}
                if "used" not in columns:
                    self._db.execute(_ADD_USED)
        if self._scalar("PRAGMA auto_vacuum") != 2:
            self._reclaim_space()

    def _reclaim_space(self) -> None:
        """Switch an older store to incremental vacuum: one VACUUM, when no one else uses it.

        SQLite changes auto_vacuum only by a VACUUM outside WAL mode, and leaving WAL mode
        needs the only connection to the file; if another process has it open, this is
        tried again at the next open, and meanwhile freed pages are reused, not returned.
        """
        self._db.set_busy_timeout(0)  # another process has it open: not now, and no wait
        try:
            with suppress(apsw.BusyError):
                mode = self._scalar("PRAGMA journal_mode=DELETE")
                if mode == "delete":
                    self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    self._db.execute("VACUUM")
        finally:
            self._db.set_busy_timeout(BUSY_TIMEOUT_MS)
            self._db.execute("PRAGMA journal_mode=WAL").fetchall()

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

    @_boundary
    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.signal.close()
        self.pins.close()

    def track_usage(self, v: int, recent: Callable[[], list[tuple[int, int, int]]] | None) -> None:
        """Register (None: forget) what tells eviction which rows of ``v`` were read lately.

        ``recent()`` returns ``(page, row_lsn, time_ns)`` of reads from the file and
        forgets them: reads are stamped in batches, never on the read path.
        """
        with self._lock:
            if recent is None:
                self._usage.pop(v, None)
            else:
                self._usage[v] = recent

    def writer_lock(self, vid: str) -> WriterLock:
        try:
            return WriterLock(os.path.join(self.cache_dir, LOCK_DIR, f"{vid}.lock"))
        except OSError as exc:
            self._check_not_deleted(f"volume {vid!r} cannot be opened")
            raise StorageError(f"cannot create the writer lock of {vid!r}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction, taking SQLite's write lock first (waiting for other processes).

        Taken up front, a read-modify-write never fails to upgrade its read lock because
        another process wrote in between (SQLITE_BUSY_SNAPSHOT in WAL mode).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(apsw.Error):
                        self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _change(self) -> Iterator[None]:
        """A write transaction on the store, signalled to other processes once committed."""
        with self._lock:
            with self._write():
                yield
            self.signal.bump()

    # -- verified reads of rows -------------------------------------------------------

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

    def _insert_log(
        self, v: int, lsn: int, page_count: int, remote_lsn: int | None, pages: bytes
    ) -> None:
        crc = _log_crc(v, lsn, page_count, remote_lsn, pages)
        self._db.execute(
            "INSERT INTO log(v, lsn, page_count, remote_lsn, pages, crc) VALUES(?,?,?,?,?,?)",
            (v, lsn, page_count, remote_lsn, pages, crc),
        )

    def _insert_pages(self, v: int, lsn: int, pages: Iterable[tuple[int, bytes | None]]) -> None:
        now = time.time_ns()
        self._db.executemany(
            "INSERT INTO pages(v, pageno, lsn, data, crc, used) VALUES(?,?,?,?,?,?)",
            ((v, p, lsn, data, _page_crc(v, p, lsn, data), now) for p, data in pages),
        )

    # -- volumes --------------------------------------------------------------------

    @_boundary
    def load_volume(self, vid: str) -> VolumeRow | None:
        with self._lock:
            row = self._volume_fields("vid", vid)
            if row is None:
                return None
            return self._volume_row(row)

    def _origin(self, v: int) -> tuple[Identity, int] | None:
        """The identity volume ``v`` came from and since which local LSN, verified."""
        row = self._db.execute(
            "SELECT store_id, volume_id, since_lsn, crc FROM origins WHERE v=?", (v,)
        ).fetchone()
        if row is None:
            return None
        if not _matches(_origin_crc, row[3], v, *row[:3]):
            raise self._corrupt(f"the identity row of volume {v} fails its checksum")
        return Identity(row[0], row[1]), row[2]

    def _set_origin(self, v: int, identity: Identity, since_lsn: int) -> None:
        crc = _origin_crc(v, identity.store_id, identity.volume_id, since_lsn)
        self._db.execute(
            "INSERT OR REPLACE INTO origins(v, store_id, volume_id, since_lsn, crc) "
            "VALUES(?,?,?,?,?)",
            (v, identity.store_id, identity.volume_id, since_lsn, crc),
        )

    def _volume_row(self, row: VolumeFields) -> VolumeRow:
        row_id, vid, local_lsn, sync_lsn, remote_lsn, diverged, intent = row
        origin = self._origin(row_id)
        return VolumeRow(
            row_id=row_id,
            vid=vid,
            local_lsn=local_lsn,
            sync_lsn=sync_lsn,
            remote_lsn=remote_lsn,
            diverged=bool(diverged),
            push_intent=msgpack.unpackb(intent) if intent else None,
            page_count=self.page_count_at(row_id, local_lsn),
            identity=origin[0] if origin else None,
            identity_lsn=origin[1] if origin else 0,
        )

    @_boundary
    def create_volume(
        self, vid: str, remote_lsn: int, page_count: int, identity: Identity | None = None
    ) -> VolumeRow:
        """Start tracking a volume at the server's snapshot ``remote_lsn`` (no page data).

        An empty volume starts at local LSN 0; one bootstrapped from the server starts
        at local LSN 1 mapped to ``remote_lsn``, of the server's volume ``identity``:
        pages are fetched when first read.
        """
        local = 0 if remote_lsn == 0 else 1
        with self._change():
            # Another process sharing the cache may have bootstrapped the same volume.
            if self._volume_fields("vid", vid) is None:
                self._db.execute(
                    "INSERT INTO volumes(vid, local_lsn, sync_lsn, remote_lsn) VALUES(?,?,?,?)",
                    (vid, local, local, remote_lsn),
                )
                row_id = self._db.last_insert_rowid()
                crc = _volume_crc(row_id, vid, local, local, remote_lsn, 0, None)
                self._db.execute("UPDATE volumes SET crc=? WHERE id=?", (crc, row_id))
                self._insert_log(row_id, local, page_count, remote_lsn, encode_graft(()))
                if identity is not None:
                    self._set_origin(row_id, identity, 0)
        row = self.load_volume(vid)
        assert row is not None
        return row

    @_boundary
    def page_count_at(self, v: int, lsn: int) -> int:
        with self._lock:
            rows = self._log_rows("v=? AND lsn<=? ORDER BY lsn DESC LIMIT 1", (v, lsn))
            return rows[0][2] if rows else 0

    @_boundary
    def sync_point(self, v: int, lsn: int) -> tuple[int, int]:
        """The latest ``(local_lsn, remote_lsn)`` pair at or before local ``lsn``.

        Pages not changed locally since then read from the server at that remote LSN.
        """
        with self._lock:
            rows = self._log_rows(
                "v=? AND lsn<=? AND remote_lsn IS NOT NULL ORDER BY lsn DESC LIMIT 1", (v, lsn)
            )
            if not rows and lsn < self._log_start(v):
                raise SnapshotExpired(
                    f"local LSN {lsn} of volume {v} is older than the local log, which "
                    "maintenance compacted (another process pushed or pulled): a new "
                    "transaction reads the latest snapshot"
                )
        if not rows:
            raise self._corrupt(f"the log of volume {v} has no sync point at or before {lsn}")
        return rows[0][1], rows[0][3]

    @_boundary
    def local_for_remote(self, v: int, remote_lsn: int) -> tuple[int, int] | None:
        """``(local_lsn, page_count)`` whose content is the server's ``remote_lsn``."""
        with self._lock:
            origin = self._origin(v)
            # Remote LSNs before the identity's first local LSN name another volume's.
            since = origin[1] if origin else 0
            rows = self._log_rows(
                "v=? AND remote_lsn=? AND lsn>=? ORDER BY lsn DESC LIMIT 1", (v, remote_lsn, since)
            )
        return (rows[0][1], rows[0][2]) if rows else None

    # -- pages ----------------------------------------------------------------------

    def read_page(self, v: int, pageno: int, lsn: int) -> tuple[int, bytes | None] | None:
        """The latest row of ``pageno`` at or before ``lsn``: ``(row_lsn, data|None)``."""
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT lsn, data, crc FROM pages WHERE v=? AND pageno=? AND lsn<=? "
                    "ORDER BY lsn DESC LIMIT 1",
                    (v, pageno, lsn),
                ).fetchone()
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise self._error(exc) from exc
        if row is None:
            return None
        row_lsn, data, crc = row
        try:
            ok = _page_crc(v, pageno, row_lsn, data) == crc
        except _CHECK_ERRORS:
            ok = False
        if not ok:
            raise self._corrupt(f"page {pageno} of volume {v} fails its checksum")
        return row_lsn, data

    @_boundary
    def store_fetched(self, v: int, rows: Iterable[tuple[int, int, bytes]]) -> None:
        """Record fetched pages ``(pageno, row_lsn, data)``; fills markers, never overwrites."""
        # Not signalled: a fetched page changes no snapshot, only what is cached.
        rows = list(rows)
        now = time.time_ns()
        with self._lock, self._write():
            self._db.executemany(
                "INSERT INTO pages(v, pageno, lsn, data, crc, used) VALUES(?,?,?,?,?,?) "
                "ON CONFLICT DO UPDATE SET data=excluded.data, crc=excluded.crc, "
                "used=excluded.used WHERE data IS NULL",
                ((v, p, lsn, data, _page_crc(v, p, lsn, data), now) for p, lsn, data in rows),
            )
        if self.max_bytes is not None:
            with self._lock:
                self._fetched += len(rows)
                due = self._fetched * PAGE_SIZE * EVICT_CHECKS >= max(self.max_bytes, PAGE_SIZE)
            if due:
                self._maintain_quietly(v)

    @_boundary
    def missing_pages(self, v: int, lsn: int, page_count: int) -> dict[int, int | None]:
        """Pages below ``page_count`` with no data at ``lsn``: ``{page: marker_lsn|None}``.

        Unverified (no data is read): a damaged row makes a page fetched or read, and
        reading it checks it.
        """
        latest: dict[int, tuple[int, bool]] = {}
        with self._lock:
            for pageno, row_lsn, has_data in self._db.execute(
                "SELECT pageno, lsn, data IS NOT NULL FROM pages WHERE v=? AND lsn<=? "
                "ORDER BY pageno, lsn",
                (v, lsn),
            ):
                latest[pageno] = (row_lsn, bool(has_data))
        missing: dict[int, int | None] = {}
        for pageno in range(page_count):
            row = latest.get(pageno)
            if row is None:
                missing[pageno] = None
            elif not row[1]:
                missing[pageno] = row[0]
        return missing

    def pages_at(self, v: int, pages: Iterable[int], lsn: int) -> dict[int, bytes]:
        """Contents of ``pages`` at local ``lsn``; every page must be present locally."""
        out = {}
        with self._lock:
            for p in pages:
                row = self.read_page(v, p, lsn)
                if row is None or row[1] is None:
                    raise self._corrupt(f"page {p} at local LSN {lsn} is missing")
                out[p] = row[1]
        return out

    # -- the local log ----------------------------------------------------------------

    @_boundary
    def commit(self, v: int, base_lsn: int, pages: dict[int, bytes], page_count: int) -> int:
        """Durably record a local commit on top of ``base_lsn``; returns its local LSN."""
        self._check_not_deleted()
        with self._change():
            head = self._volume_by_id(v)[2]
            if head != base_lsn:
                raise Busy(
                    f"commit based on local LSN {base_lsn}, but the volume is at {head} (a pull "
                    "or reset moved it on during the transaction): roll back and retry it"
                )
            lsn = head + 1
            self._insert_pages(v, lsn, pages.items())
            self._insert_log(v, lsn, page_count, None, encode_graft(pages.keys()))
            self._update_volume(v, local_lsn=lsn)
            crash_point("client.commit.before_durable")
        return lsn

    @_boundary
    def pending_changes(self, v: int, after: int, upto: int) -> BitMap:
        """Union of the pages changed by local LSNs in ``(after, upto]``."""
        bm = self.changes(v, after, upto)
        if bm is None:
            raise Busy(
                f"the local log of volume {v} before local LSN {upto} was compacted while "
                "this was read (another process pushed or pulled): retry"
            )
        return bm

    @_boundary
    def changes(self, v: int, after: int, upto: int) -> BitMap | None:
        """Union of the pages changed by local LSNs in ``(after, upto]``; None if compacted."""
        bm = BitMap()
        with self._lock:
            rows = self._log_rows("v=? AND lsn>? AND lsn<=?", (v, after, upto))
        if len(rows) != upto - after:  # every local LSN has a log row until maintenance
            return None
        for row in rows:
            bm |= decode_graft(row[4])
        return bm

    @_boundary
    def settled_floor(self, v: int) -> int:
        """The oldest local LSN of ``v`` still readable, once maintenance under way is done.

        Taking the write lock waits for a maintenance pass in progress to commit.
        """
        with self._write():
            return self._log_start(v)

    @_boundary
    def apply_pull(self, v: int, remote_lsn: int, page_count: int, changed: BitMap) -> int:
        """Record the server's ``remote_lsn`` as a new local LSN; returns it.

        Changed pages become markers (no data); they are fetched when read.
        Refuses (Diverged) if local commits are pending, which it would overwrite.
        """
        with self._change():
            _, _, head, sync, *_ = self._volume_by_id(v)
            if head != sync:
                raise Diverged("local commits are pending push; refusing to pull over them")
            lsn = head + 1
            self._insert_pages(v, lsn, ((p, None) for p in changed))
            crash_point("client.pull.mid_apply")
            self._insert_log(v, lsn, page_count, remote_lsn, encode_graft(changed))
            self._update_volume(v, local_lsn=lsn, sync_lsn=lsn, remote_lsn=remote_lsn, diverged=0)
        self._maintain_quietly(v)
        return lsn

    @_boundary
    def set_push_intent(self, v: int, intent: PushIntent | None) -> None:
        blob = (
            msgpack.packb({"local_lsn": intent.local_lsn, "base": intent.base, "hash": intent.hash})
            if intent
            else None
        )
        with self._change():
            self._update_volume(v, push_intent=blob)

    @_boundary
    def set_identity(self, v: int, identity: Identity) -> None:
        """Record the identity of a volume that had none (new, or from an older cache)."""
        with self._change():
            if self._origin(v) is None:
                self._set_origin(v, identity, 0)

    @_boundary
    def replace_origin(
        self, v: int, remote_lsn: int, page_count: int, identity: Identity
    ) -> tuple[int, BitMap]:
        """Take the server's ``remote_lsn`` of another volume ``identity`` as a new local LSN.

        Every page the cache holds a row of gets a marker (no data) at the new LSN, so
        nothing of the old volume is read at or after it: pages are fetched from the
        new one when read. Returns ``(new_lsn, changed_pages)``. Refuses (Diverged) if
        local commits are pending: they belong to the old volume.
        """
        with self._change():
            _, _, head, sync, *_ = self._volume_by_id(v)
            if head != sync:
                raise Diverged("local commits are pending push; refusing to replace the volume")
            lsn = head + 1
            changed = BitMap(
                p for (p,) in self._db.execute("SELECT DISTINCT pageno FROM pages WHERE v=?", (v,))
            )
            self._insert_pages(v, lsn, ((p, None) for p in changed))
            self._insert_log(v, lsn, page_count, remote_lsn, encode_graft(changed))
            self._update_volume(
                v, local_lsn=lsn, sync_lsn=lsn, remote_lsn=remote_lsn, diverged=0, push_intent=None
            )
            self._set_origin(v, identity, lsn)
        return lsn, changed

    @_boundary
    def record_push(
        self, v: int, local_lsn: int, remote_lsn: int, identity: Identity | None = None
    ) -> None:
        """The server accepted local LSNs up to ``local_lsn`` as ``remote_lsn`` of ``identity``."""
        with self._change():
            if identity is not None and self._origin(v) is None:
                self._set_origin(v, identity, 0)
            rows = self._log_rows("v=? AND lsn=?", (v, local_lsn))
            if not rows:
                raise self._corrupt(f"the log of volume {v} has no local LSN {local_lsn}")
            page_count, pages = rows[0][2], rows[0][4]
            self._db.execute(
                "UPDATE log SET remote_lsn=?, crc=? WHERE v=? AND lsn=?",
                (remote_lsn, _log_crc(v, local_lsn, page_count, remote_lsn, pages), v, local_lsn),
            )
            self._update_volume(
                v, sync_lsn=local_lsn, remote_lsn=remote_lsn, push_intent=None, diverged=0
            )
        self._maintain_quietly(v)

    @_boundary
    def set_diverged(self, v: int, diverged: bool) -> None:
        with self._change():
            self._update_volume(v, diverged=int(diverged))

    @_boundary
    def discard_pending(self, v: int) -> tuple[int, BitMap] | None:
        """Reset: drop local commits not pushed, as a new local LSN equal to the server's.

        Local LSNs are never reused (SQLite trusts its page cache while the change
        counter, derived from the LSN, is unchanged), so the reset is itself a new LSN
        whose changed pages get their content at the last sync point. Returns
        ``(new_lsn, changed_pages)``, or None if nothing was pending.
        """
        with self._change():
            _, _, head, sync, remote, *_ = self._volume_by_id(v)
            if head == sync:
                self._update_volume(v, push_intent=None, diverged=0)
                return None
            changed = self.pending_changes(v, sync, head)
            page_count = self.page_count_at(v, sync)
            lsn = head + 1
            rows = []
            for p in changed:
                if p < page_count:
                    row = self.read_page(v, p, sync)
                    rows.append((p, row[1] if row else None))
            self._insert_pages(v, lsn, rows)
            self._insert_log(v, lsn, page_count, remote, encode_graft(changed))
            self._update_volume(v, local_lsn=lsn, sync_lsn=lsn, push_intent=None, diverged=0)
        self._maintain_quietly(v)
        return lsn, changed

    # -- maintenance: pruning, eviction, space -----------------------------------------

    def _maintain_quietly(self, v: int) -> None:
        """Maintenance after a sync step; a busy store only postpones it to the next one."""
        with suppress(Busy):
            self.maintain(v)

    @_boundary
    def maintain(self, v: int) -> dict[str, int]:
        """One bounded pass: prune ``v``'s old versions, evict over the limit, free space."""
        with self._write():
            floor = self._floor(v, self._volume_by_id(v)[3])
            held = self._held_bytes() if self.max_bytes is not None else 0
            over = self.max_bytes is not None and held > self.max_bytes
            if (floor is None or floor <= self._log_start(v)) and not over:
                return {"pruned": 0, "evicted": 0}
            # Announce, then read the pins (PinTable): a reader that pinned an older
            # snapshot is seen here, or sees the signal and waits for this commit.
            self.pins.bump()
            pruned = self._prune(v)
            evicted = self._evict(held) if over else 0
            with self._lock:
                self._fetched = 0
            free = self._scalar("PRAGMA freelist_count")
            self._db.execute(f"PRAGMA incremental_vacuum({VACUUM_BATCH_PAGES})").fetchall()
        if free:
            # The file shrinks when the WAL is copied back into it; PASSIVE never waits
            # for readers (what they still need is copied by a later checkpoint).
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return {"pruned": pruned, "evicted": evicted}

    def _floor(self, v: int, sync_lsn: int) -> int | None:
        """The latest sync point at or before ``sync_lsn`` and every pinned snapshot of ``v``.

        Below it no snapshot is read: not by a reader (pins), nor by push (which reads
        after ``sync_lsn``) or reset (which reads at ``sync_lsn``). Being a sync point,
        every snapshot from it on has its sync point in the log kept from it on.
        """
        bound = sync_lsn
        pinned = self.pins.lowest(v)
        if pinned is not None:
            bound = min(bound, pinned)
        floor: int | None = self._scalar(
            "SELECT max(lsn) FROM log WHERE v=? AND lsn<=? AND remote_lsn IS NOT NULL", (v, bound)
        )
        return floor

    def _log_start(self, v: int) -> int:
        return int(self._scalar("SELECT min(lsn) FROM log WHERE v=?", (v,)) or 0)

    def _prune(self, v: int) -> int:
        """Drop the rows of ``v`` no snapshot from the floor on reads; returns page rows gone.

        A row is superseded once a newer row of its page exists at or before the floor;
        only pages changed since the last pass can have new superseded rows, and those
        are the pages of the log rows this pass drops.
        """
        floor = self._floor(v, self._volume_by_id(v)[3])
        start = self._log_start(v)
        if floor is None or floor <= start:
            return 0
        pages = BitMap()
        end = start
        rows = self._log_rows("v=? AND lsn>? AND lsn<=? ORDER BY lsn", (v, start, floor))
        for _, lsn, _, remote_lsn, bitmap in rows:
            pages |= decode_graft(bitmap)
            if remote_lsn is not None:
                end = lsn
                if len(pages) >= PRUNE_BATCH_PAGES:
                    break
        if end == start:
            return 0
        before = self._db.total_changes()
        self._db.executemany(
            "DELETE FROM pages WHERE v=?1 AND pageno=?2 AND lsn < (SELECT max(lsn) FROM pages "
            "WHERE v=?1 AND pageno=?2 AND lsn<=?3)",
            ((v, p, end) for p in pages),
        )
        # Pages past the end at the floor: a snapshot that grows the volume again writes
        # them (a growing commit carries every new page), or reads them from the server.
        page_count = self._log_rows("v=? AND lsn=?", (v, end))[0][2]
        self._db.execute(
            "DELETE FROM pages WHERE v=? AND pageno>=? AND lsn<=?", (v, page_count, end)
        )
        pruned = self._db.total_changes() - before
        self._db.execute("DELETE FROM log WHERE v=? AND lsn<?", (v, end))
        return pruned

    def _held_bytes(self) -> int:
        """Bytes of page data in the store, every volume together."""
        return int(self._scalar("SELECT count(*) FROM pages WHERE data IS NOT NULL")) * PAGE_SIZE

    def _evict(self, held: int) -> int:
        """Turn clean pages back into markers, least recently used first, down to the limit.

        Clean means at or before the volume's floor: every snapshot still read has its
        sync point at or after the row, so the server gives the same content back
        (a marker is fetched at the reader's sync point). Unpushed rows are never clean.
        """
        assert self.max_bytes is not None
        self._stamp_usage()
        floors = []
        volumes = cast(
            "list[tuple[int, int]]", self._db.execute("SELECT id, sync_lsn FROM volumes").fetchall()
        )
        for row_id, sync_lsn in volumes:
            floor = self._floor(row_id, sync_lsn)
            if floor is not None:
                # Readers check their snapshot against the start of the log, so nothing
                # after it is clean yet (a pass prunes a bounded stretch of the log).
                floors.append((row_id, min(floor, self._log_start(row_id))))
        if not floors:
            return 0
        wanted = min(-(-(held - self.max_bytes) // PAGE_SIZE), EVICT_BATCH_PAGES)
        values = ",".join("(?,?)" for _ in floors)
        victims = cast(
            "list[tuple[int, int, int]]",
            self._db.execute(
                f"WITH floors(v, lsn) AS (VALUES {values}) "
                "SELECT p.v, p.pageno, p.lsn FROM pages AS p JOIN floors AS f ON p.v=f.v "
                "WHERE p.lsn<=f.lsn AND p.data IS NOT NULL "
                "ORDER BY p.used, p.v, p.pageno, p.lsn LIMIT ?",
                (*(x for pair in floors for x in pair), wanted),
            ).fetchall(),
        )
        self._db.executemany(
            "UPDATE pages SET data=NULL, crc=? WHERE v=? AND pageno=? AND lsn=?",
            ((_page_crc(v, p, lsn, None), v, p, lsn) for v, p, lsn in victims),
        )
        return len(victims)

    def _stamp_usage(self) -> None:
        """Record the reads the volumes remember since the last pass, with their times."""
        with self._lock:
            recents = [(v, recent()) for v, recent in self._usage.items()]
        for v, used in recents:
            self._db.executemany(
                "UPDATE pages SET used=max(used, ?) WHERE v=? AND pageno=? AND lsn=?",
                ((when, v, p, lsn) for p, lsn, when in used),
            )
