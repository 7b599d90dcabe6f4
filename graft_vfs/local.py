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
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import apsw
import msgpack
from pyroaring import BitMap

from graft_vfs.core.graft import decode_graft, encode_graft
from graft_vfs.errors import Busy, CorruptData, Diverged, StorageError

STORE_FILE = "graft-cache.db"
SIGNAL_FILE = "graft-cache.signal"
LOCK_DIR = "locks"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes(
    id INTEGER PRIMARY KEY,
    vid TEXT UNIQUE NOT NULL,
    local_lsn INTEGER NOT NULL,
    sync_lsn INTEGER NOT NULL,
    remote_lsn INTEGER NOT NULL,
    diverged INTEGER NOT NULL DEFAULT 0,
    push_intent BLOB
);
CREATE TABLE IF NOT EXISTS log(
    v INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    page_count INTEGER NOT NULL,
    remote_lsn INTEGER,
    pages BLOB NOT NULL,
    PRIMARY KEY(v, lsn)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pages(
    v INTEGER NOT NULL,
    pageno INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    data BLOB,
    PRIMARY KEY(v, pageno, lsn)
) WITHOUT ROWID;
"""


@dataclass
class VolumeRow:
    """A volume's sync state as stored."""

    id: int
    vid: str
    local_lsn: int
    sync_lsn: int
    remote_lsn: int
    diverged: bool
    push_intent: dict | None
    page_count: int  # at local_lsn

    @property
    def pending(self) -> int:
        """Local LSNs not yet pushed."""
        return self.local_lsn - self.sync_lsn


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
        return struct.unpack_from("<Q", self._map)[0]

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


class LocalStore:
    """One cache directory's durable store; thread-safe, and shareable by processes."""

    def __init__(self, cache_dir: str) -> None:
        os.makedirs(os.path.join(cache_dir, LOCK_DIR), exist_ok=True)
        self.cache_dir = cache_dir
        self.path = os.path.join(cache_dir, STORE_FILE)
        self.signal = ChangeSignal(os.path.join(cache_dir, SIGNAL_FILE))
        self._lock = threading.RLock()
        try:
            self._db = apsw.Connection(self.path)
            self._db.set_busy_timeout(10_000)
            self._db.execute("PRAGMA journal_mode=WAL").fetchall()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except apsw.Error as exc:
            raise StorageError(f"cannot open the local store {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.signal.close()

    def writer_lock(self, vid: str) -> WriterLock:
        return WriterLock(os.path.join(self.cache_dir, LOCK_DIR, f"{vid}.lock"))

    @contextmanager
    def _change(self) -> Iterator[None]:
        """A write transaction on the store, signalled to other processes once committed."""
        with self._lock:
            with self._db:
                yield
            self.signal.bump()

    # -- volumes --------------------------------------------------------------------

    def load_volume(self, vid: str) -> VolumeRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, vid, local_lsn, sync_lsn, remote_lsn, diverged, push_intent "
                "FROM volumes WHERE vid=?",
                (vid,),
            ).fetchone()
            if row is None:
                return None
            return self._volume_row(row)

    def _volume_row(self, row: tuple) -> VolumeRow:
        vid_id, vid, local_lsn, sync_lsn, remote_lsn, diverged, intent = row
        return VolumeRow(
            id=vid_id,
            vid=vid,
            local_lsn=local_lsn,
            sync_lsn=sync_lsn,
            remote_lsn=remote_lsn,
            diverged=bool(diverged),
            push_intent=msgpack.unpackb(intent) if intent else None,
            page_count=self.page_count_at(vid_id, local_lsn),
        )

    def list_volumes(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT vid FROM volumes ORDER BY vid")]

    def create_volume(self, vid: str, remote_lsn: int, page_count: int) -> VolumeRow:
        """Start tracking a volume at the server's snapshot ``remote_lsn`` (no page data).

        An empty volume starts at local LSN 0; one bootstrapped from the server starts
        at local LSN 1 mapped to ``remote_lsn``: pages are fetched when first read.
        """
        local = 0 if remote_lsn == 0 else 1
        with self._change():
            # Another process sharing the cache may be bootstrapping the same volume.
            self._db.execute(
                "INSERT INTO volumes(vid, local_lsn, sync_lsn, remote_lsn) VALUES(?,?,?,?) "
                "ON CONFLICT(vid) DO NOTHING",
                (vid, local, local, remote_lsn),
            )
            if not self._db.changes():
                row = self.load_volume(vid)
                assert row is not None
                return row
            vol_id = self._db.last_insert_rowid()
            self._db.execute(
                "INSERT INTO log(v, lsn, page_count, remote_lsn, pages) VALUES(?,?,?,?,?)",
                (vol_id, local, page_count, remote_lsn, encode_graft(())),
            )
        row = self.load_volume(vid)
        assert row is not None
        return row

    def page_count_at(self, v: int, lsn: int) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT page_count FROM log WHERE v=? AND lsn<=? ORDER BY lsn DESC LIMIT 1",
                (v, lsn),
            ).fetchone()
            return row[0] if row else 0

    def sync_point(self, v: int, lsn: int) -> tuple[int, int]:
        """The latest ``(local_lsn, remote_lsn)`` pair at or before local ``lsn``.

        Pages not changed locally since then read from the server at that remote LSN.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT lsn, remote_lsn FROM log WHERE v=? AND lsn<=? AND remote_lsn IS NOT NULL "
                "ORDER BY lsn DESC LIMIT 1",
                (v, lsn),
            ).fetchone()
        if row is None:
            raise CorruptData(f"local log of volume {v} has no sync point at or before {lsn}")
        return row[0], row[1]

    def local_for_remote(self, v: int, remote_lsn: int) -> tuple[int, int] | None:
        """``(local_lsn, page_count)`` whose content is the server's ``remote_lsn``."""
        with self._lock:
            row = self._db.execute(
                "SELECT lsn, page_count FROM log WHERE v=? AND remote_lsn=? "
                "ORDER BY lsn DESC LIMIT 1",
                (v, remote_lsn),
            ).fetchone()
        return (row[0], row[1]) if row else None

    # -- pages ----------------------------------------------------------------------

    def read_page(self, v: int, pageno: int, lsn: int) -> tuple[int, bytes | None] | None:
        """The latest row of ``pageno`` at or before ``lsn``: ``(row_lsn, data|None)``."""
        with self._lock:
            return self._db.execute(
                "SELECT lsn, data FROM pages WHERE v=? AND pageno=? AND lsn<=? "
                "ORDER BY lsn DESC LIMIT 1",
                (v, pageno, lsn),
            ).fetchone()

    def store_fetched(self, v: int, rows: Iterable[tuple[int, int, bytes]]) -> None:
        """Record fetched pages ``(pageno, row_lsn, data)``; fills markers, never overwrites."""
        # Not signalled: a fetched page changes no snapshot, only what is cached.
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO pages(v, pageno, lsn, data) VALUES(?,?,?,?) "
                "ON CONFLICT DO UPDATE SET data=excluded.data WHERE data IS NULL",
                ((v, p, lsn, data) for p, lsn, data in rows),
            )

    def missing_pages(self, v: int, lsn: int, page_count: int) -> dict[int, int | None]:
        """Pages below ``page_count`` with no data at ``lsn``: ``{page: marker_lsn|None}``."""
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
                    raise CorruptData(f"page {p} at local LSN {lsn} is missing from the cache")
                out[p] = row[1]
        return out

    # -- the local log ----------------------------------------------------------------

    def commit(self, v: int, base_lsn: int, pages: dict[int, bytes], page_count: int) -> int:
        """Durably record a local commit on top of ``base_lsn``; returns its local LSN."""
        with self._change():
            (head,) = self._db.execute("SELECT local_lsn FROM volumes WHERE id=?", (v,)).fetchone()
            if head != base_lsn:
                raise Busy(
                    f"commit based on local LSN {base_lsn}, but the volume is at {head} (a pull "
                    "or reset moved it on during the transaction): roll back and retry it"
                )
            lsn = head + 1
            self._db.executemany(
                "INSERT INTO pages(v, pageno, lsn, data) VALUES(?,?,?,?)",
                ((v, p, lsn, data) for p, data in pages.items()),
            )
            self._db.execute(
                "INSERT INTO log(v, lsn, page_count, remote_lsn, pages) VALUES(?,?,?,NULL,?)",
                (v, lsn, page_count, encode_graft(pages.keys())),
            )
            self._db.execute("UPDATE volumes SET local_lsn=? WHERE id=?", (lsn, v))
        return lsn

    def pending_changes(self, v: int, after: int, upto: int) -> BitMap:
        """Union of the pages changed by local LSNs in ``(after, upto]``."""
        bm = BitMap()
        with self._lock:
            for (blob,) in self._db.execute(
                "SELECT pages FROM log WHERE v=? AND lsn>? AND lsn<=?", (v, after, upto)
            ):
                bm |= decode_graft(blob)
        return bm

    def apply_pull(self, v: int, remote_lsn: int, page_count: int, changed: BitMap) -> int:
        """Record the server's ``remote_lsn`` as a new local LSN; returns it.

        Changed pages become markers (no data); they are fetched when read.
        Refuses (Diverged) if local commits are pending, which it would overwrite.
        """
        with self._change():
            head, sync = self._db.execute(
                "SELECT local_lsn, sync_lsn FROM volumes WHERE id=?", (v,)
            ).fetchone()
            if head != sync:
                raise Diverged("local commits are pending push; refusing to pull over them")
            lsn = head + 1
            self._db.executemany(
                "INSERT INTO pages(v, pageno, lsn, data) VALUES(?,?,?,NULL)",
                ((v, p, lsn) for p in changed),
            )
            self._db.execute(
                "INSERT INTO log(v, lsn, page_count, remote_lsn, pages) VALUES(?,?,?,?,?)",
                (v, lsn, page_count, remote_lsn, encode_graft(changed)),
            )
            self._db.execute(
                "UPDATE volumes SET local_lsn=?, sync_lsn=?, remote_lsn=?, diverged=0 WHERE id=?",
                (lsn, lsn, remote_lsn, v),
            )
        return lsn

    def set_push_intent(self, v: int, intent: PushIntent | None) -> None:
        blob = (
            msgpack.packb({"local_lsn": intent.local_lsn, "base": intent.base, "hash": intent.hash})
            if intent
            else None
        )
        with self._change():
            self._db.execute("UPDATE volumes SET push_intent=? WHERE id=?", (blob, v))

    def record_push(self, v: int, local_lsn: int, remote_lsn: int) -> None:
        """The server accepted local LSNs up to ``local_lsn`` as ``remote_lsn``."""
        with self._change():
            self._db.execute(
                "UPDATE log SET remote_lsn=? WHERE v=? AND lsn=?", (remote_lsn, v, local_lsn)
            )
            self._db.execute(
                "UPDATE volumes SET sync_lsn=?, remote_lsn=?, push_intent=NULL, diverged=0 "
                "WHERE id=?",
                (local_lsn, remote_lsn, v),
            )

    def set_diverged(self, v: int, diverged: bool) -> None:
        with self._change():
            self._db.execute("UPDATE volumes SET diverged=? WHERE id=?", (int(diverged), v))

    def discard_pending(self, v: int) -> tuple[int, BitMap] | None:
        """Reset: drop local commits not pushed, as a new local LSN equal to the server's.

        Local LSNs are never reused (SQLite trusts its page cache while the change
        counter, derived from the LSN, is unchanged), so the reset is itself a new LSN
        whose changed pages get their content at the last sync point. Returns
        ``(new_lsn, changed_pages)``, or None if nothing was pending.
        """
        with self._change():
            head, sync, remote = self._db.execute(
                "SELECT local_lsn, sync_lsn, remote_lsn FROM volumes WHERE id=?", (v,)
            ).fetchone()
            if head == sync:
                self._db.execute("UPDATE volumes SET push_intent=NULL, diverged=0 WHERE id=?", (v,))
                return None
            changed = self.pending_changes(v, sync, head)
            page_count = self.page_count_at(v, sync)
            lsn = head + 1
            rows = []
            for p in changed:
                if p < page_count:
                    row = self.read_page(v, p, sync)
                    rows.append((v, p, lsn, row[1] if row else None))
            self._db.executemany("INSERT INTO pages(v, pageno, lsn, data) VALUES(?,?,?,?)", rows)
            self._db.execute(
                "INSERT INTO log(v, lsn, page_count, remote_lsn, pages) VALUES(?,?,?,?,?)",
                (v, lsn, page_count, remote, encode_graft(changed)),
            )
            self._db.execute(
                "UPDATE volumes SET local_lsn=?, sync_lsn=?, push_intent=NULL, diverged=0 "
                "WHERE id=?",
                (lsn, lsn, v),
            )
        return lsn, changed
