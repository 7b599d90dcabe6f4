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

Page data lives beside the file, in the page file (``pagefile``) at fixed 4 KiB slots
that the page rows name (see ``rows``); rows of stores made before it keep their data
inline and are read as they are.

The store is built in layers: ``rows.StoreFile`` (the SQLite file, its transactions,
its rows' checksums: damage), ``maintenance.Maintenance`` (pruning, eviction, space)
and ``LocalStore`` here (the schema and its formats, volumes, identities, the local
log, pages). What processes sharing the directory share besides the file (the change
signal, writer locks, the pin table) is in ``sharing``.

Damage. A cache damaged on disk raises ``CorruptData`` naming the file and the fix
(see ``rows``). A cache file deleted or replaced under a running client keeps working
for reads, pushes and pulls (Linux keeps the open file), but a local commit is refused:
it would vanish with the process.

Identity. ``origins`` records, per volume, the identity (``core.identity``) of the
server's volume its pages came from and the first local LSN they came from it, so a
cache never mixes pages of two incarnations of one volume name.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import apsw
import msgpack
from pyroaring import BitMap

from graft_vfs.client.maintenance import Checkpointer, Maintenance
from graft_vfs.client.pagefile import PAGES_FILE, PageFile, SlotMap
from graft_vfs.client.rows import (
    BUSY_TIMEOUT_MS,
    VolumeFields,
    _boundary,
    _log_crc,
    _matches,
    _origin_crc,
    _page_crc,
    _slots_crc,
    _volume_crc,
)
from graft_vfs.client.sharing import ChangeSignal, PinTable, WriterLock
from graft_vfs.core.errors import (
    Busy,
    CorruptData,
    Diverged,
    InvalidRequest,
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
STORE_CACHE_KIB = 16384  # SQLite's page cache of the store file (SQLite's default: 2000)
# The store file is read through a memory map up to this size (PRAGMA mmap_size): a page
# of the file already copied back from the WAL costs no system call and no copy into
# SQLite's page cache. Only reads use it; SQLite writes with pwrite as before.
STORE_MMAP_BYTES = 1 << 30

SLOT_MAP_PAGES = 1 << 20  # entries of a volume's SlotMap before it starts again (4 GiB of pages)
WAL_KEEP_BYTES = 1 << 20  # the -wal file is cut back to this after a checkpoint
ABSENT_BATCH = 512  # pages per query of ``without_data``

# PRAGMA user_version of the store. 0: the first format; 1: every row has a crc;
# 2: the origins table (the identity of each volume's server side); 3: the read_sets
# table (the pages each pending local commit read, for Options(rebase=True)); 4: the page
# file (pages.slot, free_slots, page_file; rows with inline data stay readable).
FORMAT = 4

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

# Format 3 -> 4, and part of a new store: the page file's free slots and size, and the
# triggers that free a slot in the transaction that drops or empties its row. ``slot``
# is added to ``pages`` before this runs.
_PAGE_FILE = """
CREATE TABLE IF NOT EXISTS free_slots(slot INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS page_file(
    id INTEGER PRIMARY KEY,
    slots INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS pages_slot_dropped AFTER DELETE ON pages
WHEN old.slot IS NOT NULL BEGIN
    INSERT OR IGNORE INTO free_slots(slot) VALUES(old.slot);
END;
CREATE TRIGGER IF NOT EXISTS pages_slot_emptied AFTER UPDATE OF slot ON pages
WHEN old.slot IS NOT NULL AND new.slot IS NOT old.slot BEGIN
    INSERT OR IGNORE INTO free_slots(slot) VALUES(old.slot);
END;
"""
_ADD_SLOT = "ALTER TABLE pages ADD COLUMN slot INTEGER"

_ORIGINS = """
CREATE TABLE IF NOT EXISTS origins(
    v INTEGER PRIMARY KEY,
    store_id BLOB NOT NULL,
    volume_id BLOB NOT NULL,
    since_lsn INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
"""

# The pages each local commit not pushed yet read (a graft), kept so that a rejected push
# can be rebased after a restart too; a commit without a row cannot be rebased.
_READ_SETS = """
CREATE TABLE IF NOT EXISTS read_sets(
    v INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    pages BLOB NOT NULL,
    crc INTEGER NOT NULL,
    PRIMARY KEY(v, lsn)
) WITHOUT ROWID;
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


@dataclass(frozen=True)
class PushIntent:
    """A push in flight, recorded before it is sent so a crash can resolve it."""

    local_lsn: int
    base: int
    hash: bytes
    nonce: bytes = b""  # the push's random bytes, kept so its retries have its hash


class LocalStore(Maintenance):
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
        self._maps: dict[int, SlotMap] = {}  # per volume, the page file's map (read_page)
        try:
            self.pagefile = PageFile(os.path.join(cache_dir, PAGES_FILE))
        except OSError as exc:
            self.signal.close()
            self.pins.close()
            raise StorageError(f"cannot open the local cache {cache_dir}: {exc}") from exc
        try:
            self._db = apsw.Connection(self.path)
        except apsw.Error as exc:
            self.pagefile.close()
            self.signal.close()
            self.pins.close()
            raise StorageError(f"cannot open the local cache {self.path}: {exc}") from exc
        try:
            self._db.set_busy_timeout(BUSY_TIMEOUT_MS)
            # Only a new file takes this (before its first table); see _reclaim_space.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL").fetchall()
            self._db.execute("PRAGMA synchronous=FULL")
            # A local commit of thousands of pages (a VACUUM) fits without spilling.
            self._db.execute(f"PRAGMA cache_size=-{STORE_CACHE_KIB}")
            self._db.execute(f"PRAGMA mmap_size={STORE_MMAP_BYTES}").fetchall()
            self._db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}").fetchall()
            self._prepare()
            self._prepare_maintenance()
            self._check_page_file()
            self._identity = self._file_identity()
            self._checkpoints = Checkpointer(
                self.path, functools.partial(self.pagefile.sync, shared=True)
            )
            self._db.set_wal_hook(self._checkpoints.hook)
        except BaseException as exc:
            if self._checkpoints is not None:
                self._checkpoints.close()
            self._db.close()
            self.pagefile.close()
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
                self._db.execute(_SCHEMA + _ORIGINS + _READ_SETS)
                self.pagefile.truncate(0)  # of a store that is gone
            elif version == 3 and tables == 3:
                pass
            elif version == 2 and tables == 3:
                self._db.execute(_READ_SETS)
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
                    if self._has_slots():  # (rows naming slots have an empty data)
                        slot_crc: Callable[..., int] = self._slot_crc
                        self._db.create_scalar_function("graft_slot_crc", slot_crc)
                        self._db.execute(
                            "UPDATE pages SET crc = graft_slot_crc(v, pageno, lsn, slot) "
                            "WHERE slot IS NOT NULL"
                        )
                # Volumes of an older cache have no identity yet: each takes the one of
                # its server's volume at its first contact (see sync.Sync.reconcile).
                self._db.execute(_ORIGINS + _READ_SETS)
            elif version != FORMAT:
                raise StorageError(
                    f"the local cache {self.path} has format {version} (tables: {tables}), "
                    f"which this graft_vfs (format {FORMAT}) does not know: use the graft_vfs "
                    f"that made it, or delete the directory {self.cache_dir} to rebuild it "
                    "from the server (local commits not pushed yet are lost with it)"
                )
            # The page file (format 4): older rows keep their inline data.
            if not self._has_slots():
                self._db.execute(_ADD_SLOT)
            self._db.execute(_PAGE_FILE)
            self._db.execute(
                "INSERT OR IGNORE INTO page_file(id, slots, crc) VALUES(0, 0, ?)", (_slots_crc(0),)
            )
            self._db.execute(f"PRAGMA user_version={FORMAT}")

    def _slot_crc(self, v: Any, pageno: Any, lsn: Any, slot: Any) -> int:
        """The crc of the page row naming ``slot`` (a SQL function of the format 0 upgrade)."""
        return _page_crc(v, pageno, lsn, self.pagefile.read(slot))

    def _has_slots(self) -> bool:
        return "slot" in {row[1] for row in self._db.execute("PRAGMA table_info(pages)")}

    def _check_page_file(self) -> None:
        """A page file missing while rows name its slots is damage, said at open."""
        if self.pagefile.existed:
            return
        free = self._scalar("SELECT count(*) FROM free_slots")
        if self._slot_end() > free:
            raise self._corrupt(
                f"its page file {self.pagefile.path} is missing, and page rows name slots of it"
            )

    @_boundary
    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()
        with self._lock:
            # Closing the last connection checkpoints the WAL: the rows' data first.
            self.pagefile.sync(shared=True)
            self._db.close()
            self.pagefile.close()
        self.signal.close()
        self.pins.close()

    def writer_lock(self, vid: str) -> WriterLock:
        try:
            return WriterLock(os.path.join(self.cache_dir, LOCK_DIR, f"{vid}.lock"))
        except OSError as exc:
            self._check_not_deleted(f"volume {vid!r} cannot be opened")
            raise StorageError(f"cannot create the writer lock of {vid!r}: {exc}") from exc

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
        """The latest row of ``pageno`` at or before ``lsn``: ``(row_lsn, data|None)``.

        A page the volume's ``SlotMap`` knows at ``lsn`` is a ``pread`` and a CRC, no SQL.
        """
        m = self._maps.get(v)
        if m is not None and lsn <= m.known:
            entry = m.rows.get(pageno)
            if entry is not None and entry[0] <= lsn:
                row_lsn, slot, crc = entry
                data = self.pagefile.read(slot)
                if _page_crc(v, pageno, row_lsn, data) == crc:
                    return row_lsn, data
                m.rows.pop(pageno, None)  # freed and taken again, or damage: SQL says
        try:
            m = self._slot_map(v, lsn)
            row = self._page_rows(v, pageno, lsn)
            out = self._read_page_row(v, pageno, lsn, row)
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise self._error(exc) from exc
        if row is not None and row[3] is not None and out is not None and out[1] is not None:
            self._remember_slots(m, lsn, v, [(pageno, row[0], row[3], row[2])])
        return out

    def _slot_map(self, v: int, lsn: int) -> SlotMap:
        """Volume ``v``'s SlotMap, brought to snapshot ``lsn`` if it knows an older one.

        Entries of the pages changed after what it knew are dropped (the local log
        says which): they were superseded, by this process or another. A log pruned
        meanwhile drops them all.
        """
        with self._lock:
            m = self._maps.get(v)
            if m is None:
                m = self._maps[v] = SlotMap(lsn)
            elif lsn > m.known:
                changed = self.changes(v, m.known, lsn)
                if changed is None:
                    m.rows.clear()
                else:
                    for p in changed:
                        m.rows.pop(p, None)
                m.known = lsn
            return m

    def _remember_slots(
        self, m: SlotMap, lsn: int, v: int, rows: Iterable[tuple[int, int, int, int]]
    ) -> None:
        """Add ``(pageno, row_lsn, slot, crc)`` rows read at ``lsn`` to ``m``, if it is there.

        A row read at an older snapshot than ``known`` may have been superseded after it.
        """
        with self._lock:
            if m.known != lsn or self._maps.get(v) is not m:
                return
            if len(m.rows) >= SLOT_MAP_PAGES:
                m.rows.clear()
            for pageno, row_lsn, slot, crc in rows:
                m.rows[pageno] = (row_lsn, slot, crc)

    def read_run(
        self, v: int, first: int, count: int, lsn: int
    ) -> list[tuple[int, int, bytes | None]]:
        """The latest row at or before ``lsn`` of each page in ``[first, first + count)``.

        ``(pageno, row_lsn, data|None)`` for the pages that have a row, in page order:
        one query for a run of pages, so a sequential reader pays for SQL once per run
        instead of once per page (and neighbouring slots are read in one ``pread``).
        Each row is verified as ``read_page`` verifies one: ``first`` failing its
        checksum raises CorruptData; any other page that fails is left out (it raises
        when it is read, and is never served).
        """
        known = self._run_from_map(v, first, count, lsn)
        if known is not None:
            return known
        latest: dict[int, tuple[Any, ...]] = {}
        try:
            m = self._slot_map(v, lsn)
            with self._lock:
                for pageno, row_lsn, data, crc, slot in self._db.execute(
                    "SELECT pageno, lsn, data, crc, slot FROM pages WHERE v=? AND pageno>=? "
                    "AND pageno<? AND lsn<=? ORDER BY pageno, lsn",
                    (v, first, first + count, lsn),
                ):
                    latest[pageno] = (row_lsn, data, crc, slot)  # the last is the latest
            pages = list(latest.items())
            remember: list[tuple[int, int, int, int]] = []
            slots = {pageno: row[3] for pageno, row in pages if row[3] is not None}
            self._read_slots(pages)
            out = []
            for pageno, row in pages:
                row_lsn, data, crc, slot = row
                if _matches(_page_crc, crc, v, pageno, row_lsn, data):
                    out.append((pageno, row_lsn, data))
                    if slot is not None:
                        remember.append((pageno, row_lsn, slots[pageno], crc))
                    continue
                try:  # a slot taken again since the query, or damage: look again
                    again = self._read_page_row(v, pageno, lsn) if slot is not None else None
                except CorruptData:
                    again = None
                if again is not None:
                    out.append((pageno, *again))
                elif pageno == first:
                    raise self._corrupt(f"page {pageno} of volume {v} fails its checksum")
            self._remember_slots(m, lsn, v, remember)
            return out
        except (apsw.Error, UnicodeDecodeError) as exc:
            raise self._error(exc) from exc

    def _run_from_map(
        self, v: int, first: int, count: int, lsn: int
    ) -> list[tuple[int, int, bytes | None]] | None:
        """``read_run`` from the SlotMap if it knows every page of the run, else None.

        Neighbouring slots are read with one ``pread``; every page is verified.
        """
        m = self._maps.get(v)
        if m is None or lsn > m.known:
            return None
        get = m.rows.get
        entries = [get(p) for p in range(first, first + count)]
        for entry in entries:
            if entry is None or entry[0] > lsn:
                return None
        known = cast("list[tuple[int, int, int]]", entries)
        read = self.pagefile.read
        out: list[tuple[int, int, bytes | None]] = []
        i = 0
        while i < count:
            slot = known[i][1]
            j = i + 1
            while j < count and known[j][1] == slot + j - i:
                j += 1
            block = read(slot, j - i)
            for k in range(i, j):
                row_lsn, _, crc = known[k]
                pageno = first + k
                data = block[(k - i) * PAGE_SIZE : (k - i + 1) * PAGE_SIZE]
                if _page_crc(v, pageno, row_lsn, data) != crc:
                    m.rows.pop(pageno, None)
                    return None  # a slot taken again, or damage: SQL says which
                out.append((pageno, row_lsn, data))
            i = j
        return out

    def _read_slots(self, pages: list[tuple[int, tuple[Any, ...]]]) -> None:
        """Replace the slot of each row ``(lsn, data, crc, slot)`` by its bytes, in place.

        Rows of neighbouring slots are read with one ``pread``; bytes short of a page
        (the file ends first) fail the row's checksum.
        """
        i = 0
        while i < len(pages):
            slot = pages[i][1][3]
            if slot is None:
                i += 1
                continue
            j = i + 1
            while j < len(pages) and pages[j][1][3] == slot + (j - i):
                j += 1
            try:
                block = self.pagefile.read(slot, j - i)
            except (OSError, OverflowError, TypeError, ValueError):
                block = b""
            for k in range(i, j):
                pageno, (row_lsn, _, crc, s) = pages[k]
                off = (k - i) * PAGE_SIZE
                pages[k] = (pageno, (row_lsn, block[off : off + PAGE_SIZE], crc, s))
            i = j

    @_boundary
    def store_fetched(self, v: int, rows: Iterable[tuple[int, int, bytes]]) -> None:
        """Record fetched pages ``(pageno, row_lsn, data)``; fills markers, never overwrites."""
        # Not signalled: a fetched page changes no snapshot, only what is cached. Not
        # synced either: a crash that loses them costs fetching them again (the page
        # file is synced before any durable commit or checkpoint makes their rows so).
        rows = list(rows)
        with self._lock, self._write(durable=False):
            values, slots = self._page_values(v, rows)
            stored = set(
                self._db.executemany(
                    "INSERT INTO pages(v, pageno, lsn, data, slot, crc, used) "
                    "VALUES(?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET data=excluded.data, "
                    "slot=excluded.slot, crc=excluded.crc, used=excluded.used "
                    "WHERE data IS NULL RETURNING pageno, lsn",
                    values,
                )
            )
            # Rows another process filled first keep theirs: these slots stay free.
            self._give_back_slots(
                s for i, s in slots.items() if (rows[i][0], rows[i][1]) not in stored
            )
        self._after_fetch(v, len(rows))

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
        return _lacking(latest, range(page_count))

    @_boundary
    def without_data(self, v: int, pages: Iterable[int], lsn: int) -> dict[int, int | None]:
        """Which of ``pages`` have no data at ``lsn``: ``{page: marker_lsn|None}``, as
        ``missing_pages`` says for a whole snapshot, in one query per 512 pages (a run
        of neighbours in one range query) instead of one query per page.

        Unverified, as ``missing_pages``: a damaged row is checked when it is read.
        """
        wanted = sorted(set(pages))
        latest: dict[int, tuple[int, bool]] = {}
        with self._lock:
            for i in range(0, len(wanted), ABSENT_BATCH):
                chunk = wanted[i : i + ABSENT_BATCH]
                if chunk[-1] - chunk[0] < 2 * len(chunk):  # dense: one range
                    where, args = "pageno BETWEEN ? AND ?", [chunk[0], chunk[-1]]
                else:
                    where, args = f"pageno IN ({','.join('?' * len(chunk))})", chunk
                for pageno, row_lsn, has_data in self._db.execute(
                    f"SELECT pageno, lsn, data IS NOT NULL FROM pages WHERE v=? AND {where} "
                    "AND lsn<=? ORDER BY pageno, lsn",
                    (v, *args, lsn),
                ):
                    latest[pageno] = (row_lsn, bool(has_data))  # the last is the latest
        return _lacking(latest, wanted)

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
    def commit(
        self,
        v: int,
        base_lsn: int,
        pages: dict[int, bytes],
        page_count: int,
        reads: BitMap | None = None,
    ) -> int:
        """Durably record a local commit on top of ``base_lsn``; returns its local LSN.

        ``reads``, the pages the transaction read, is kept with it (for a rebase).
        """
        self._check_not_deleted()
        with self._lock:
            with self._change():
                head = self._volume_by_id(v)[2]
                if head != base_lsn:
                    raise Busy(
                        f"commit based on local LSN {base_lsn}, but the volume is at {head} (a "
                        "pull or reset moved it on during the transaction): roll back and "
                        "retry it"
                    )
                lsn = head + 1
                # In key order: each leaf of the page index is filled once, then left alone.
                self._insert_pages(v, lsn, sorted(pages.items()))
                self._insert_log(v, lsn, page_count, None, encode_graft(pages.keys()))
                if reads is not None:
                    self._insert_reads(v, lsn, reads)
                self._update_volume(v, local_lsn=lsn)
                crash_point("client.commit.before_durable")
                slots = cast(
                    "list[tuple[int, int, int]]",
                    self._db.execute(
                        "SELECT pageno, slot, crc FROM pages WHERE v=? AND lsn=? "
                        "AND slot IS NOT NULL",
                        (v, lsn),
                    ).fetchall(),
                )
            self._keep_slot_map(v, base_lsn, lsn, pages, slots)
        return lsn

    def _keep_slot_map(
        self,
        v: int,
        base_lsn: int,
        lsn: int,
        pages: dict[int, bytes],
        rows: list[tuple[int, int, int]],
    ) -> None:
        """After this process committed ``pages`` at ``lsn`` on ``base_lsn``, their slots
        ``rows`` ``(pageno, slot, crc)``: a SlotMap that knew ``base_lsn`` knows ``lsn``
        (called holding the lock, after the commit: nothing landed in between).
        """
        m = self._maps.get(v)
        if m is None or m.known != base_lsn:
            return
        for p in pages:
            m.rows.pop(p, None)
        if len(m.rows) + len(rows) >= SLOT_MAP_PAGES:
            m.rows.clear()
        for pageno, slot, crc in rows:
            m.rows[pageno] = (lsn, slot, crc)
        m.known = lsn

    def _insert_reads(self, v: int, lsn: int, reads: BitMap) -> None:
        blob = encode_graft(reads)
        self._db.execute(
            "INSERT OR REPLACE INTO read_sets(v, lsn, pages, crc) VALUES(?,?,?,?)",
            (v, lsn, blob, _log_crc(v, lsn, 0, None, blob)),
        )

    @_boundary
    def read_sets(self, v: int, after: int, upto: int) -> BitMap | None:
        """Union of the pages read by local commits in ``(after, upto]``; None if one is unknown.

        Unknown: a commit made without ``Options(rebase=True)``, or whose read set was
        over the bound. Each row is verified before it is decoded.
        """
        out = BitMap()
        with self._lock:
            rows = self._db.execute(
                "SELECT lsn, pages, crc FROM read_sets WHERE v=? AND lsn>? AND lsn<=?",
                (v, after, upto),
            ).fetchall()
        if len(rows) != upto - after:
            return None
        for lsn, blob, crc in rows:
            what = f"the read set of local LSN {lsn} of volume {v}"
            if not _matches(_log_crc, crc, v, lsn, 0, None, blob):
                raise self._corrupt(f"{what} fails its checksum")
            try:
                out |= decode_graft(blob)
            except InvalidRequest:
                raise self._corrupt(f"{what} is malformed") from None
        return out

    @_boundary
    def rebase(
        self,
        v: int,
        target: int,
        remote_lsn: int,
        remote_page_count: int,
        remote_changed: BitMap,
        pages: dict[int, bytes],
        page_count: int,
        reads: BitMap,
    ) -> tuple[int, BitMap]:
        """Move the local commits up to ``target`` onto the server's ``remote_lsn``.

        In one store transaction: the server's snapshot becomes a new local LSN (its
        ``remote_changed`` pages markers, as a pull records them) and the pending
        commits' pages, rebased (``pages``, page 1 merged), one local commit on top of
        it, pending push and carrying ``reads``. Returns ``(new_lsn, changed_pages)``.
        Raises Busy if a local commit landed since ``target`` (the caller tries again).
        The new snapshot of the server's holds none of the pending commits' pages, so a
        reset after a later refusal discards them as it would without the rebase.
        """
        with self._change():
            _, _, head, sync, *_ = self._volume_by_id(v)
            if head != target or head == sync:
                raise Busy(f"volume {v} moved on locally during its rebase: retry")
            pulled = head + 1
            # The server's snapshot exactly: the pages it changed are markers, and the
            # pages only the pending commits changed are back at their content at the
            # sync point (a reset after a later refusal reads them there).
            rows: list[tuple[int, bytes | None]] = [(p, None) for p in remote_changed]
            restored = BitMap()
            for p in self.pending_changes(v, sync, head) - remote_changed:
                if p < remote_page_count:
                    row = self.read_page(v, p, sync)
                    rows.append((p, row[1] if row else None))
                    restored.add(p)
            self._insert_pages(v, pulled, rows)
            self._insert_log(
                v, pulled, remote_page_count, remote_lsn, encode_graft(remote_changed | restored)
            )
            lsn = pulled + 1
            self._insert_pages(v, lsn, sorted(pages.items()))
            self._insert_log(v, lsn, page_count, None, encode_graft(pages.keys()))
            self._db.execute("DELETE FROM read_sets WHERE v=? AND lsn<=?", (v, head))
            self._insert_reads(v, lsn, reads)
            self._update_volume(
                v,
                local_lsn=lsn,
                sync_lsn=pulled,
                remote_lsn=remote_lsn,
                diverged=0,
                push_intent=None,
            )
        changed = BitMap(remote_changed)
        changed.update(pages.keys())
        return lsn, changed

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
            msgpack.packb(
                {
                    "local_lsn": intent.local_lsn,
                    "base": intent.base,
                    "hash": intent.hash,
                    "nonce": intent.nonce,
                }
            )
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
            self._db.execute("DELETE FROM read_sets WHERE v=? AND lsn<=?", (v, local_lsn))
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
            self._db.execute("DELETE FROM read_sets WHERE v=?", (v,))
        self._maintain_quietly(v)
        return lsn, changed


def _lacking(latest: dict[int, tuple[int, bool]], pages: Iterable[int]) -> dict[int, int | None]:
    """Of ``pages``, those whose latest row (``latest``: page -> (lsn, has data)) has no
    data: ``{page: the row's lsn (a marker) | None (no row)}``."""
    out: dict[int, int | None] = {}
    for pageno in pages:
        row = latest.get(pageno)
        if row is None:
            out[pageno] = None
        elif not row[1]:
            out[pageno] = row[0]
    return out
