"""The ``graft`` apsw VFS: SQLite locks, reads and writes become snapshots and commits.

Locks map to snapshots the way WAL mode behaves: SHARED pins the latest local snapshot
(readers never block writers; a read outside any lock, such as the header SQLite reads
as it opens, pins the latest snapshot for that read), RESERVED takes the volume's writer
lock and is refused with SQLITE_BUSY if another writer holds it or if the pinned
snapshot is no longer the latest. Written pages are buffered and become one local commit
(one LSN) when SQLite syncs the database at commit time (SQLITE_FCNTL_SYNC, sent
whatever the ``synchronous`` setting); leaving RESERVED drops whatever was not
committed. The main database's rollback journal lives in memory (every graft main
database runs in ``journal_mode=MEMORY``); temporary databases, statement journals and
sorter spills are real temporary files of the default VFS, as natively. In
``locking_mode=EXCLUSIVE`` SHARED takes the writer lock too, and keeps it.

Errors: code below the VFS methods raises graft errors only; ``sqlite_errors``, wrapped
around every method that can fail, turns them into SQLite result codes with the one
table ``SQLITE_CODES`` (xRead, xLock and xUnlock, called on every page and transaction,
do the same inline, which costs nothing until something raises).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import apsw
from pyroaring import BitMap

from graft_vfs.client.catchup import (
    DEFAULT_WAIT_TIMEOUT,
    parse_lsn,
    parse_timeout,
    wait_for_lsn,
)
from graft_vfs.client.pragmas import PRAGMA_PREFIX, PRAGMAS
from graft_vfs.client.runtime import Runtime
from graft_vfs.client.sync import MAX_READ_SET
from graft_vfs.client.when import parse_time
from graft_vfs.core.errors import (
    Busy,
    CorruptData,
    Forbidden,
    GraftError,
    InvalidRequest,
    InvalidVolumeId,
    ReadOnly,
    RemoteError,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    Unauthorized,
    UnsupportedDatabase,
    VolumeNotFound,
)
from graft_vfs.core.ids import PAGE_SIZE, validate_volume_id
from graft_vfs.core.pages import (
    ZERO_PAGE,
    header_page_count,
    page1_for_commit,
    same_page1,
    with_counter,
)

SQLITE_FCNTL_PRAGMA = 14
SQLITE_FCNTL_SYNC = 21
LOCK_NONE, LOCK_SHARED, LOCK_RESERVED = 0, 1, 2
# Where SQLite reads the change counter (and the next 12 header bytes) to learn whether
# its page cache is still valid when a read transaction starts.
CHANGE_CHECK, CHANGE_CHECK_SIZE = 24, 16
# Files SQLite may make as large as the data it sorts or stages: kept on disk, as natively.
TEMP_FILES = (
    apsw.SQLITE_OPEN_TEMP_DB
    | apsw.SQLITE_OPEN_TEMP_JOURNAL
    | apsw.SQLITE_OPEN_SUBJOURNAL
    | apsw.SQLITE_OPEN_TRANSIENT_DB
)
# The rollback journal modes that keep a journal file; a graft main database keeps its
# journal in memory whatever is asked (see _memory_journal).
FILE_JOURNAL_MODES = ("delete", "truncate", "persist")
# PRAGMAs that read the connection's snapshot: outside a transaction, the latest, pinned.
SNAPSHOT_PRAGMAS = frozenset({"graft_snapshot"})
_PAGE_SHIFT = 12
_PAGE_MASK = PAGE_SIZE - 1


class StaleSnapshot(Busy):
    """A write transaction began on a read snapshot that is no longer the latest."""


class NotAVolumeFile(UnsupportedDatabase):
    """SQLite asked for a file a volume cannot have (a WAL, a super-journal on disk)."""


# GraftError -> the apsw exception (and so the SQLite result code) SQLite sees, and the
# extended result code where SQLite has a more precise one. The nearest class in an
# error's MRO decides; a GraftError found nowhere here is SQLITE_ERROR.
SQLITE_CODES: dict[type[GraftError], tuple[type[apsw.Error], int | None]] = {
    # As WAL mode reports a read snapshot too old to write.
    StaleSnapshot: (apsw.BusyError, apsw.SQLITE_BUSY_SNAPSHOT),
    Busy: (apsw.BusyError, None),
    VolumeNotFound: (apsw.CantOpenError, None),
    InvalidVolumeId: (apsw.CantOpenError, None),
    SnapshotNotFound: (apsw.CantOpenError, None),
    NotAVolumeFile: (apsw.CantOpenError, None),
    SnapshotExpired: (apsw.IOError, None),
    CorruptData: (apsw.CorruptError, None),
    RemoteError: (apsw.IOError, None),
    StorageError: (apsw.IOError, None),
    ReadOnly: (apsw.ReadOnlyError, None),
    Unauthorized: (apsw.AuthError, None),
    Forbidden: (apsw.AuthError, None),
}


def to_sqlite(exc: GraftError) -> apsw.Error:
    """The apsw exception for a graft error, with the same message."""
    for cls in type(exc).__mro__:
        if cls in SQLITE_CODES:
            error, extended = SQLITE_CODES[cls]
            out = error(f"graft: {exc}")
            if extended is not None:
                out.extendedresult = extended  # type: ignore[attr-defined]
            return out
    return apsw.SQLError(f"graft: {exc}")


F = TypeVar("F", bound=Callable[..., Any])


def sqlite_errors(fn: F) -> F:
    """The VFS's one error boundary: a GraftError leaves as the apsw error of SQLITE_CODES.

    Every VFS method that can fail is wrapped; below it, code raises graft errors only.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GraftError as exc:
            raise to_sqlite(exc) from exc

    return wrapper  # type: ignore[return-value]


@sqlite_errors
def _memory_journal(con: apsw.Connection) -> None:
    """Every connection whose main database is a volume starts in journal_mode=MEMORY.

    In DELETE, TRUNCATE or PERSIST mode a COMMIT across the volume and an attached file
    writes a super-journal through this VFS, in memory: after a crash the file's hot
    journal would name a super-journal that is not on disk, and SQLite would delete
    it without rolling the file back. In MEMORY mode each database commits atomically
    on its own and no super-journal is written.
    """
    if con.open_vfs in GRAFT_VFS_NAMES and not con.filename:
        # SQLite opens an empty name as a private temporary database without asking
        # the VFS until it spills: it would look like a volume and be none.
        validate_volume_id("")
    # apsw names a Python VFS's file by its class (open_vfs is only what the opener asked).
    if con.vfsname("main") == f"{GraftFile.__module__}.{GraftFile.__qualname__}":
        con.execute("PRAGMA main.journal_mode=MEMORY").fetchall()


apsw.connection_hooks.append(_memory_journal)
GRAFT_VFS_NAMES: set[str] = set()  # every GraftVFS registered in this process


class GraftVFS(apsw.VFS):
    """The VFS: the main database file is a volume; its journal is in memory."""

    def __init__(self, name: str, runtime: Runtime) -> None:
        self.runtime = runtime
        self.vfs_name = name
        super().__init__(name, "")
        GRAFT_VFS_NAMES.add(name)

    @sqlite_errors
    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> Any:
        kind = flags[0]
        if kind & apsw.SQLITE_OPEN_MAIN_DB and name is not None:
            return GraftFile(self.runtime, name, flags)
        if kind & TEMP_FILES:
            return apsw.VFSFile("", name, flags)
        if kind & apsw.SQLITE_OPEN_WAL:
            # A WAL in memory would take commits that never reach the volume.
            raise NotAVolumeFile("volumes have no WAL; use journal_mode=MEMORY")
        if kind & apsw.SQLITE_OPEN_SUPER_JOURNAL:
            # A transaction writing two or more attached files with journals on disk: the
            # super-journal SQLite names them in is opened through the main database's
            # VFS, and one in memory would let a crash half-commit those files.
            raise NotAVolumeFile(
                "a transaction that writes two or more attached database files "
                "needs a super-journal on disk, which a connection opened on a volume "
                "cannot write: open the connection on a plain file and ATTACH the volume "
                "('file:VOLUME?vfs=graft'), or write the files in separate transactions"
            )
        return MemoryFile()

    def xSleep(self, microseconds: int) -> int:
        # apsw.VFS.xSleep sleeps holding the GIL, so while a busy handler waits the
        # connection holding the lock cannot run its (Python) VFS calls to release it.
        time.sleep(microseconds / 1_000_000)
        return microseconds

    def xAccess(self, pathname: str, flags: int) -> bool:
        # No journal, WAL or temp file ever persists, so there is never a hot journal.
        return False

    def xFullPathname(self, name: str) -> str:
        return name

    def xDelete(self, filename: str, syncdir: bool) -> None:
        return None


class GraftFile:
    """One connection's handle on a volume."""

    def __init__(self, runtime: Runtime, name: str | apsw.URIFilename, flags: list[int]) -> None:
        inflags = flags[0]
        vid = name.filename() if isinstance(name, apsw.URIFilename) else name
        lsn_param = name.uri_parameter("lsn") if isinstance(name, apsw.URIFilename) else None
        at_param = name.uri_parameter("at") if isinstance(name, apsw.URIFilename) else None
        if at_param is not None:
            # The latest LSN committed at or before a time: asked of the server, then
            # opened as lsn=N.
            if lsn_param is not None:
                raise InvalidRequest("give lsn=N or at=TIME in the URI, not both")
            try:
                when = parse_time(at_param)
            except ValueError as exc:
                raise InvalidRequest(f"at={at_param[:40]!r}: {exc}") from None
            lsn_param = str(runtime.require_remote().lsn_at(vid, when).lsn)
        immutable = isinstance(name, apsw.URIFilename) and name.uri_boolean("immutable", False)
        self.readonly = (
            bool(inflags & apsw.SQLITE_OPEN_READONLY) or lsn_param is not None or immutable
        )
        create = bool(inflags & apsw.SQLITE_OPEN_CREATE) and not self.readonly
        self.runtime = runtime
        self.vol = runtime.volume(vid, create=create)
        self.snap: tuple[int, int] | None = None  # (local lsn, page count) while locked
        self.fixed: tuple[int, int] | None = None  # a past snapshot (lsn=N)
        self.remote_lsn: int | None = None  # past snapshot not in the local log
        self._remote_pages: dict[int, bytes] = {}
        min_lsn = name.uri_parameter("min_lsn") if isinstance(name, apsw.URIFilename) else None
        if min_lsn is not None:
            assert isinstance(name, apsw.URIFilename)
            if lsn_param is not None:
                raise InvalidRequest("min_lsn=N waits for a newer snapshot; lsn=N opens a past one")
            timeout = name.uri_parameter("min_lsn_timeout")
            wait_for_lsn(
                self.vol,
                parse_lsn(min_lsn, "min_lsn"),
                DEFAULT_WAIT_TIMEOUT
                if timeout is None
                else parse_timeout(timeout, "min_lsn_timeout"),
            )
        if lsn_param is not None:
            self._open_past(lsn_param)
        elif immutable:
            # SQLite takes no lock on an immutable file and never re-checks its page
            # cache, so the connection must read one snapshot: the latest at the open,
            # pinned from now on (no xLock will pin it).
            self._catch_up()
            self.fixed = self.vol.hold(self)
        # Bound once: the read path's page read (or a past snapshot's) and the pins.
        self._read: Callable[[int, int], bytes] = (
            self.vol.reads.read_page if self.remote_lsn is None else self._read_past
        )
        self._pin = self.vol.pin
        self._unpin = self.vol.unpin
        self.level = LOCK_NONE
        self.writing = False
        self.exclusive = False  # PRAGMA locking_mode=EXCLUSIVE
        self.journal_off = False  # PRAGMA journal_mode=OFF
        self.dirty: dict[int, bytes] = {}
        self.size = 0
        self._page1: tuple[int, bytes] | None = None
        self._page1_rewritten = False  # a commit changed page 1 from what SQLite wrote
        # Options(rebase=True): every page read since SQLite's page cache was last
        # invalidated (it serves cached pages without xRead while the change counter,
        # the LSN, holds), so a commit's read set covers what it read from that cache
        # too; ``_cache_lsn`` is the snapshot SQLite's cache holds pages of.
        self.read_set: BitMap | None = (
            BitMap() if runtime.options.rebase and not self.readonly else None
        )
        self._cache_lsn: int | None = None
        if self.readonly:
            flags[1] = (inflags | apsw.SQLITE_OPEN_READONLY) & ~(
                apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
            )
        else:
            flags[1] = inflags

    def _open_past(self, param: str) -> None:
        try:
            lsn = int(param)
            if lsn < 0:
                raise ValueError
        except ValueError:
            raise SnapshotNotFound(f"lsn={param!r} is not a non-negative integer") from None
        found = self.vol.local_snapshot_of(lsn)
        if found is not None:
            try:
                # Pinned from the open, before SQLite's first read (the header, unlocked).
                self.fixed = self.vol.hold(self, found)
                return
            except SnapshotExpired:
                pass  # compacted since it was found: the server has it, unless collected
        entry = self.runtime.require_remote().log_entry(self.vol.vid, lsn) if lsn else None
        if entry is None:
            raise SnapshotNotFound(f"volume {self.vol.vid!r} has no LSN {lsn} on the server")
        self.remote_lsn = lsn
        self.fixed = (lsn, int(entry["page_count"]))

    # -- locks ------------------------------------------------------------------------

    def xLock(self, level: int) -> None:
        # The error boundary inline (as in xRead and xUnlock): these run on every
        # transaction, and a try block costs nothing until something raises.
        try:
            if level == LOCK_SHARED:
                self._catch_up()
                self.snap = self._pin(self, self.fixed) if self.remote_lsn is None else self.fixed
                if self.exclusive and not self.readonly and not self.writing:
                    # In locking_mode=EXCLUSIVE SQLite keeps its lock and its page cache
                    # until the mode is NORMAL again and never looks for other writers'
                    # changes: the connection holds the writer lock from its first read,
                    # so it keeps seeing its own latest state and others get BUSY, as
                    # natively.
                    self.snap = None
                    self._begin_write()
            elif level >= LOCK_RESERVED and not self.writing:
                self._begin_write()
        except GraftError as exc:
            raise to_sqlite(exc) from exc
        self.level = level

    def _catch_up(self) -> None:
        runtime = self.runtime
        if runtime.signal.value() != runtime.seen_signal:
            runtime.catch_up()  # another process changed the cache directory

    def _begin_write(self) -> None:
        if self.readonly:
            raise ReadOnly("this connection is read-only")
        vol = self.vol
        if not vol.acquire_writer():
            # Plain SQLITE_BUSY: the busy handler (busy_timeout) waits for the writer.
            raise Busy("another connection is writing to this volume")
        try:
            vol.reload()  # the latest snapshot, whichever process made it
        except GraftError:
            vol.release_writer()
            raise
        snap = self.snap or vol.snapshot
        if snap[0] != vol.snapshot[0]:
            vol.release_writer()
            raise StaleSnapshot("snapshot is stale: roll back and retry")
        self.snap = snap
        self.writing = True
        self.dirty = {}
        self.size = snap[1] * PAGE_SIZE

    def xUnlock(self, level: int) -> None:
        try:
            if level < LOCK_RESERVED and self.writing:
                self._end_write()
            if level == LOCK_NONE:
                self._unpin(self)
                self.snap = None
        except GraftError as exc:
            raise to_sqlite(exc) from exc
        self.level = level

    def _end_write(self) -> None:
        self.dirty = {}
        self.writing = False
        self.vol.release_writer()

    def xCheckReservedLock(self) -> bool:
        return self.vol.writer_held()

    # -- reads ------------------------------------------------------------------------

    def xRead(self, amount: int, offset: int) -> bytes:
        read_set = self.read_set
        if read_set is not None:
            self._track(read_set, amount, offset)
        try:
            snap = self.snap or self.fixed
            if snap is None:
                return self._read_unlocked(amount, offset)
            if amount == PAGE_SIZE and not offset & _PAGE_MASK:
                # The fast path: a whole page but page 1, written by this transaction or
                # in its snapshot.
                pageno = offset >> _PAGE_SHIFT
                if self.writing:
                    data = self.dirty.get(pageno)
                    if data is not None and pageno:
                        return data
                    if not pageno or pageno >= self.size >> _PAGE_SHIFT:
                        return self._read_any(amount, offset)
                if 0 < pageno < snap[1]:
                    return self._read(pageno, snap[0])
            if offset == CHANGE_CHECK and amount == CHANGE_CHECK_SIZE:
                # Where SQLite looks, at the start of each transaction, whether its
                # page cache is still valid: page 1 of this LSN is kept ready.
                page1 = self._page1
                if page1 is not None and not self._page1_rewritten and not self.writing:
                    if page1[0] == snap[0]:
                        return page1[1][CHANGE_CHECK : CHANGE_CHECK + CHANGE_CHECK_SIZE]
            return self._read_any(amount, offset)
        except GraftError as exc:
            raise to_sqlite(exc) from exc

    def _read_unlocked(self, amount: int, offset: int) -> bytes:
        """A read outside any transaction: SQLite reads the header as it opens, unlocked.

        It reads the latest snapshot, pinned for the read as a transaction's is: unpinned,
        a pull (of this process or another) could compact it between taking the
        snapshot and reading it, and the open would fail with SnapshotExpired.
        """
        with self._pinned_latest():
            return self._read_any(amount, offset)

    @contextmanager
    def _pinned_latest(self) -> Iterator[None]:
        """The latest snapshot, pinned while the block runs (no transaction holds one)."""
        self._catch_up()
        self.snap = self._pin(self)
        try:
            yield
        finally:
            self.snap = None
            self._unpin(self)

    def _track(self, read_set: BitMap, amount: int, offset: int) -> None:
        """Add the pages of a read to the read set (Options(rebase=True))."""
        if self._cache_lsn is None:
            self._cache_lsn = (self.snap or self.current())[0]  # SQLite's first read
        elif offset == CHANGE_CHECK and amount == CHANGE_CHECK_SIZE:
            # A read transaction begins: SQLite compares the change counter (the LSN)
            # with its cache's and drops the cache if they differ; then so does this.
            lsn = (self.snap or self.current())[0]
            if lsn != self._cache_lsn or self._page1_rewritten:
                read_set.clear()
                self._cache_lsn = lsn
        if amount > 0:
            read_set.add_range(offset >> _PAGE_SHIFT, ((offset + amount - 1) >> _PAGE_SHIFT) + 1)

    def _read_any(self, amount: int, offset: int) -> bytes:
        if self._page1_rewritten and offset <= CHANGE_CHECK < offset + amount:
            self._page1_rewritten = False
            if (offset, amount) == (CHANGE_CHECK, CHANGE_CHECK_SIZE):
                # SQLite's cache still holds the page 1 it wrote; a change counter other
                # than the one it expects makes it drop the cache and read page 1 again.
                header = self._read_any(amount, offset)
                return bytes(b ^ 0xFF for b in header[:4]) + header[4:]
        within = offset & _PAGE_MASK
        if within + amount <= PAGE_SIZE:
            data = self._page(offset >> _PAGE_SHIFT)
            if data is None:
                return b""
            if amount == PAGE_SIZE:
                return data
            return data[within : within + amount]
        out = bytearray()
        while amount > 0:
            data = self._page(offset >> _PAGE_SHIFT)
            if data is None:
                break
            within = offset & _PAGE_MASK
            take = min(amount, PAGE_SIZE - within)
            out += data[within : within + take]
            offset += take
            amount -= take
        return bytes(out)

    def _page(self, pageno: int) -> bytes | None:
        if self.writing:
            data = self.dirty.get(pageno)
            if data is not None:
                return data
            if pageno >= self.size >> _PAGE_SHIFT:
                return None
        lsn, page_count = self.current()
        if pageno >= page_count:
            return ZERO_PAGE if self.writing else None
        if pageno == 0:
            cached = self._page1
            if cached is not None and cached[0] == lsn:
                return cached[1]
            data = with_counter(self._read(0, lsn), lsn)
            self._page1 = (lsn, data)
            return data
        return self._read(pageno, lsn)

    def _read_past(self, pageno: int, lsn: int) -> bytes:
        """A page of a past snapshot the local log no longer holds (``lsn=N``)."""
        assert self.remote_lsn is not None
        data = self._remote_pages.get(pageno)
        if data is None:
            data = self.vol.read_remote_page(pageno, self.remote_lsn)
            self._remote_pages[pageno] = data
        return data

    def current(self) -> tuple[int, int]:
        """The ``(local LSN, page count)`` this connection reads now."""
        return self.snap or self.fixed or self.vol.snapshot

    def xFileSize(self) -> int:
        if self.writing:
            return self.size
        return self.current()[1] * PAGE_SIZE

    # -- writes -----------------------------------------------------------------------

    def xWrite(self, data: Any, offset: int) -> None:
        if self.writing and len(data) == PAGE_SIZE and not offset & _PAGE_MASK:
            # The fast path: a whole page (SQLite writes nothing else to a database).
            self.dirty[offset >> _PAGE_SHIFT] = bytes(data)
            if offset + PAGE_SIZE > self.size:
                self.size = offset + PAGE_SIZE
            return
        try:
            self._write_any(data, offset)
        except GraftError as exc:
            raise to_sqlite(exc) from exc

    def _write_any(self, data: Any, offset: int) -> None:
        if not self.writing:
            raise StorageError("write outside a write transaction")
        data = bytes(data)
        end = offset + len(data)
        while data:
            pageno = offset >> _PAGE_SHIFT
            within = offset & _PAGE_MASK
            take = min(len(data), PAGE_SIZE - within)
            if within == 0 and take == PAGE_SIZE:
                self.dirty[pageno] = data[:PAGE_SIZE]
            else:
                old = self._page(pageno) or ZERO_PAGE
                self.dirty[pageno] = old[:within] + data[:take] + old[within + take :]
            data = data[take:]
            offset += take
        if end > self.size:
            self.size = end

    @sqlite_errors
    def xTruncate(self, newsize: int) -> None:
        if not self.writing:
            raise StorageError("truncate outside a write transaction")
        self.size = newsize
        keep = -(-newsize // PAGE_SIZE)
        for pageno in [p for p in self.dirty if p >= keep]:
            del self.dirty[pageno]

    def xSync(self, flags: int) -> None:
        return None  # the commit happened at SQLITE_FCNTL_SYNC, just before

    def _commit(self) -> None:
        assert self.snap is not None
        base_lsn, base_count = self.snap
        page_count = -(-self.size // PAGE_SIZE)
        page1 = self.dirty.get(0)
        if page1 is not None:
            written, page1 = page1, page1_for_commit(page1)
            self.dirty[0] = page1
            self._page1_rewritten = page1 != written
        if page1 is not None and header_page_count(page1):
            # SQLite truncates the file only after the sync (VACUUM, auto-vacuum), but
            # the page 1 it wrote already holds the database's size after the commit.
            page_count = header_page_count(page1)
        changed: dict[int, bytes] = {}
        vol = self.vol
        for pageno, data in self.dirty.items():
            if pageno >= page_count:
                continue
            if pageno < base_count:
                # SQLite rewrites page 1 for the change counter alone and writes the
                # original pages back on a rollback after a cache spill: keep only
                # pages that really differ from the snapshot.
                old = vol.peek_page(pageno, base_lsn)
                if old is not None and (same_page1(old, data) if pageno == 0 else old == data):
                    continue
            changed[pageno] = data
        for pageno in range(base_count, page_count):
            changed.setdefault(pageno, ZERO_PAGE)  # a growing commit carries every new page
        if changed or page_count != base_count:
            # Raises Busy if a pull or reset moved the volume on since the snapshot. The
            # pages stay buffered: SQLite keeps the transaction open after a failed
            # commit and a retried COMMIT does not write them again, so it must fail
            # again (or commit them all), never succeed with nothing committed.
            reads = self.read_set
            if reads is not None and len(reads) > MAX_READ_SET:
                reads = None  # too many to keep: this commit will not be rebased
            try:
                self.snap = vol.commit(
                    base_lsn, changed, page_count, None if reads is None else BitMap(reads)
                )
            except Busy as exc:
                if not self.exclusive:
                    raise
                # SQLite never gives up an exclusive lock, or its page cache, on its own.
                raise Busy(
                    f"{exc} (this connection is in locking_mode=EXCLUSIVE: run PRAGMA "
                    "locking_mode=NORMAL and one more transaction before retrying)"
                ) from exc
            self.size = page_count * PAGE_SIZE
            # SQLite keeps its cache across its own commit (the counter it wrote is the
            # new LSN's): the read set goes on.
            self._cache_lsn = self.snap[0]
        self.dirty = {}

    # -- file controls and PRAGMAs ----------------------------------------------------

    @sqlite_errors
    def xFileControl(self, op: int, ptr: int) -> bool:
        if op == SQLITE_FCNTL_SYNC:
            if self.writing:
                self._commit()
            return True
        if op == SQLITE_FCNTL_PRAGMA:
            return self._pragma(apsw.VFSFcntlPragma(ptr))
        return False

    def _pragma(self, p: apsw.VFSFcntlPragma) -> bool:
        name = p.name.lower()
        if name == "journal_mode" and p.value is not None and p.value.lower() == "wal":
            raise InvalidRequest(
                "WAL mode is not supported on graft volumes (a Python VFS has no "
                "shared memory); use PRAGMA journal_mode=MEMORY"
            )
        answer = self._sqlite_pragma(name, p.value)
        if answer is not None:
            p.result = answer
            return True
        handler = PRAGMAS.get(name)
        if handler is None:
            if name.startswith(PRAGMA_PREFIX):
                # SQLite ignores an unknown PRAGMA: a typo would look like an answer.
                raise InvalidRequest(
                    f"unknown PRAGMA {name}; the graft PRAGMAs are " + ", ".join(sorted(PRAGMAS))
                )
            return False
        if name in SNAPSHOT_PRAGMAS and self.snap is None and self.fixed is None:
            with self._pinned_latest():  # outside a transaction: the latest snapshot
                result = handler(self, p.value)
        else:
            result = handler(self, p.value)
        p.result = json.dumps(result, sort_keys=True, ensure_ascii=False)
        return True

    def _sqlite_pragma(self, name: str, value: str | None) -> str | None:
        """Check or follow one of SQLite's own PRAGMAs; a string answers it instead."""
        if value is None:
            return None
        value = value.strip().strip("'\"").lower()
        if name == "journal_mode":
            if value in FILE_JOURNAL_MODES:
                return "off" if self.journal_off else "memory"  # see _memory_journal
            if value in ("memory", "off"):
                self.journal_off = value == "off"
        elif name == "page_size" and value != str(PAGE_SIZE):
            # Anything else, however SQLite would read it, is refused.
            raise InvalidRequest(
                f"volumes use {PAGE_SIZE}-byte pages, PRAGMA page_size={value} is "
                f"refused; a database with another page size converts with sqlite3 FILE "
                f"\"PRAGMA page_size={PAGE_SIZE}; VACUUM INTO 'new.db'\" (journal_mode="
                "DELETE), then graft import new.db"
            )
        elif name == "locking_mode" and value in ("exclusive", "normal"):
            self.exclusive = value == "exclusive"
        return None

    def xSectorSize(self) -> int:
        return PAGE_SIZE

    def xDeviceCharacteristics(self) -> int:
        return apsw.SQLITE_IOCAP_POWERSAFE_OVERWRITE

    def xClose(self) -> None:
        if self.writing:
            self._end_write()
        self.snap = None


class MemoryFile:
    """A journal or temporary file held in memory, private to one open."""

    def __init__(self) -> None:
        self.data = bytearray()

    def xRead(self, amount: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + amount])

    def xWrite(self, data: Any, offset: int) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def xTruncate(self, newsize: int) -> None:
        del self.data[newsize:]

    def xFileSize(self) -> int:
        return len(self.data)

    def xSync(self, flags: int) -> None:
        return None

    def xLock(self, level: int) -> None:
        return None

    def xUnlock(self, level: int) -> None:
        return None

    def xCheckReservedLock(self) -> bool:
        return False

    def xFileControl(self, op: int, ptr: int) -> bool:
        return False

    def xSectorSize(self) -> int:
        return PAGE_SIZE

    def xDeviceCharacteristics(self) -> int:
        return 0

    def xClose(self) -> None:
        self.data = bytearray()
