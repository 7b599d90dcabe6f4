"""The local store's maintenance: pruning old versions, eviction over a size limit, space.

Maintenance (after pushes, pulls and resets, and after fetches when the cache has a size
limit) keeps only the versions a live snapshot can still read: below the volume's
*floor*, the latest sync point at or before both ``sync_lsn`` and the oldest snapshot
any process sharing the directory has pinned (``sharing.PinTable``), each page keeps
its latest row and the log keeps nothing. Over the size limit, clean pages (rows at or
before the floor, which the server can give back) become markers again, least recently
used first; unpushed rows are never touched. Freed file pages go back to the file system
with ``PRAGMA incremental_vacuum``. Each pass does a bounded amount of work.

Checkpoints. Copying the WAL back into the file is off the commit path: SQLite's
automatic checkpoint would run in the committing thread after each commit past 1000
WAL frames, so a local commit paid for writing its pages twice, and syncing the file,
before SQLite heard of its success. A ``Checkpointer`` thread does it instead (see there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from typing import cast

import apsw
from pyroaring import BitMap

from graft_vfs.client.pagefile import SlotMap
from graft_vfs.client.rows import BUSY_TIMEOUT_MS, StoreFile, _boundary, _matches, _page_crc
from graft_vfs.client.sharing import PinTable
from graft_vfs.core.errors import Busy
from graft_vfs.core.graft import decode_graft
from graft_vfs.core.ids import PAGE_SIZE

PRUNE_BATCH_PAGES = 4096  # distinct pages one maintenance pass prunes old versions of
EVICT_BATCH_PAGES = 4096  # pages one maintenance pass evicts
VACUUM_BATCH_PAGES = 4096  # free file pages one maintenance pass returns to the file system
COMPACT_MIN_SLOTS = 64  # free slots (and half the page file) before a pass moves pages down
USAGE_LOG = 4096  # page reads from the cache file remembered for eviction order
EVICT_CHECKS = 16  # eviction passes while fetches fill a cache of the limit's size
CHECKPOINT_PAGES = 1000  # WAL frames that wake the checkpoint thread (SQLite's default)
CHECKPOINT_WAIT_PAGES = 65536  # WAL frames past which a commit waits for a checkpoint (256 MiB)
CHECKPOINT_WAIT_SECONDS = 60.0  # the longest such a wait lasts

# Added to stores of any format when missing: eviction order (ns since the epoch of the
# last read or write of the row; a damaged value only changes what is evicted first).
_ADD_USED = "ALTER TABLE pages ADD COLUMN used INTEGER NOT NULL DEFAULT 0"


class Checkpointer:
    """Copies the store's WAL back into its file on a thread of its own.

    The store's WAL hook (``hook``, which replaces SQLite's automatic checkpoint) only
    counts frames; past CHECKPOINT_PAGES it wakes a daemon thread that runs a PASSIVE
    checkpoint on a connection of its own to the same file (it waits for no reader or
    writer; another process's checkpoint in progress makes it skip one). A commit that
    leaves more than CHECKPOINT_WAIT_PAGES frames (commits faster than the thread copies
    them) waits for the thread's pass to end (``wait``, from ``Maintenance._committed``),
    so the WAL stays bounded. Durability does not change: a commit is durable once its
    WAL frames are synced.
    """

    def __init__(self, path: str, before: Callable[[], None]) -> None:
        self._before = before  # run before each checkpoint: syncs the page file
        # Read-write, never create: a file deleted under the client is not made again.
        self._con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
        self._con.set_busy_timeout(0)
        # A connection checkpoints only once it has read the file and found it in WAL mode.
        self._con.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        self._wake = threading.Condition()
        self._due = False
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.frames = 0  # WAL frames after the store's last commit

    def hook(self, con: apsw.Connection, name: str, frames: int) -> int:
        """The store connection's WAL hook: called after each commit with the WAL's frames."""
        self.frames = frames
        if frames >= CHECKPOINT_PAGES:
            with self._wake:
                if not self._closed:
                    self._due = True
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=self._run, name="graft-checkpoint", daemon=True
                        )
                        self._thread.start()
                    self._wake.notify()
        return apsw.SQLITE_OK

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                self._due = False
                self._running = True
            try:
                # Errors are the store connection's to report: it reads the same file.
                # A checkpoint makes the rows of fetched pages durable: their data first.
                with suppress(apsw.Error, OSError):
                    self._before()
                    self._con.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            finally:
                with self._wake:
                    self._running = False
                    self._wake.notify_all()

    def wait(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until no checkpoint is due or running."""
        with self._wake:
            self._wake.wait_for(
                lambda: self._closed or not (self._due or self._running), timeout=timeout
            )

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._con.close()


class Maintenance(StoreFile):
    """Pruning, eviction and space of the store (the base of ``local.LocalStore``)."""

    pins: PinTable
    max_bytes: int | None  # page data kept at most (None: no limit)
    _usage: dict[int, Callable[[], list[tuple[int, int, int]]]]
    _fetched: int  # pages fetched since the last eviction pass
    _maps: dict[int, SlotMap]  # the page file's map of each volume (see ``local``)
    _checkpoints: Checkpointer | None = None  # None until the store is open

    def _committed(self) -> None:
        checkpoints = self._checkpoints
        if checkpoints is not None and checkpoints.frames >= CHECKPOINT_WAIT_PAGES:
            checkpoints.wait(CHECKPOINT_WAIT_SECONDS)

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

    @_boundary
    def settled_floor(self, v: int) -> int:
        """The oldest local LSN of ``v`` still readable, once maintenance under way is done.

        Taking the write lock waits for a maintenance pass in progress to commit.
        """
        with self._write():
            return self._log_start(v)

    def _after_fetch(self, v: int, pages: int) -> None:
        """``pages`` were fetched into the store: a pass is due every so often under a limit."""
        if self.max_bytes is None:
            return
        with self._lock:
            self._fetched += pages
            due = self._fetched * PAGE_SIZE * EVICT_CHECKS >= max(self.max_bytes, PAGE_SIZE)
        if due:
            self._maintain_quietly(v)

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
            self._compact_page_file()
            self._cut_page_file()
            free = self._scalar("PRAGMA freelist_count")
            self._db.execute(f"PRAGMA incremental_vacuum({VACUUM_BATCH_PAGES})").fetchall()
        if free or pruned or evicted:
            # The file shrinks when the WAL is copied back into it; PASSIVE never waits
            # for readers (what they still need is copied by a later checkpoint). The
            # checkpoint makes the rows of fetched pages durable: their data first. The
            # store's lock keeps other threads' statements on this connection out (one
            # in progress makes the checkpoint fail: SQLITE_LOCKED); a checkpoint that
            # cannot run now runs at a later pass, or on the checkpoint thread.
            with self._lock, suppress(apsw.LockedError, apsw.BusyError):
                self.pagefile.sync(shared=True)
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
        m = self._maps.get(v)
        if m is not None:
            for p in [p for p, e in m.rows.items() if p >= page_count and e[0] <= end]:
                del m.rows[p]
        pruned = self._db.total_changes() - before
        self._db.execute("DELETE FROM log WHERE v=? AND lsn<?", (v, end))
        return pruned

    def _compact_page_file(self) -> None:
        """Move pages from the page file's tail into its free slots, once half of it is free.

        A bounded batch per pass; the rows are updated in the pass's transaction (their
        old slots freed, then cut by ``_cut_page_file``), after the bytes are written
        and synced (the pass is a durable transaction). A reader that read a row before
        its move reads its old slot, cut or taken again: its checksum fails and it
        finds the moved row when it looks again. Finding the rows of the tail scans the
        rows' keys (``slot`` has no index, which every write would pay for), hence the
        threshold.
        """
        end = self._slot_end()
        free = int(self._scalar("SELECT count(*) FROM free_slots"))
        live = end - free
        if free < COMPACT_MIN_SLOTS or free * 2 < end:
            return
        holes = [
            s
            for (s,) in self._db.execute(
                "SELECT slot FROM free_slots WHERE slot<? ORDER BY slot LIMIT ?",
                (live, VACUUM_BATCH_PAGES),
            )
        ]
        movers = cast(
            "list[tuple[int, int, int, int, int]]",
            self._db.execute(
                "SELECT v, pageno, lsn, crc, slot FROM pages WHERE slot>=? "
                "ORDER BY slot DESC LIMIT ?",
                (live, len(holes)),
            ).fetchall(),
        )
        moves = []
        for v, pageno, lsn, crc, slot in movers:
            data = self.pagefile.read(slot)
            if _matches(_page_crc, crc, v, pageno, lsn, data):  # damage stays where it is
                moves.append((v, pageno, lsn, data))
        holes = holes[: len(moves)]
        if not moves:
            return
        self._db.executemany("DELETE FROM free_slots WHERE slot=?", ((s,) for s in holes))
        self.pagefile.write(holes, [data for *_, data in moves])
        self._db.executemany(
            "UPDATE pages SET slot=? WHERE v=? AND pageno=? AND lsn=?",
            ((s, v, pageno, lsn) for s, (v, pageno, lsn, _) in zip(holes, moves, strict=True)),
        )
        for v, pageno, lsn, _ in moves:  # this process's maps read them at their old slot
            self._forget_slot(v, pageno, lsn)

    def _cut_page_file(self) -> None:
        """Give the page file's free tail back to the file system (a bounded stretch).

        Inside the pass's transaction: the slots cut are free whether it commits or not,
        and a reader that still reads one gets short bytes, fails the checksum, and finds
        its row changed when it looks again.
        """
        end = self._slot_end()
        cut = end
        tail = cast(
            "list[tuple[int]]",
            self._db.execute(
                "SELECT slot FROM free_slots WHERE slot>=? ORDER BY slot DESC",
                (end - VACUUM_BATCH_PAGES,),
            ).fetchall(),
        )
        for (slot,) in tail:
            if slot != cut - 1:
                break
            cut = slot
        if cut < end:
            self._db.execute("DELETE FROM free_slots WHERE slot>=?", (cut,))
            self._set_slot_end(cut)
            self.pagefile.truncate(cut)

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
            "UPDATE pages SET data=NULL, slot=NULL, crc=? WHERE v=? AND pageno=? AND lsn=?",
            ((_page_crc(v, p, lsn, None), v, p, lsn) for v, p, lsn in victims),
        )
        # This process's maps forget them (another's find the slot taken again, or its
        # bytes still right: the row's content never changes).
        for v, p, lsn in victims:
            self._forget_slot(v, p, lsn)
        return len(victims)

    def _forget_slot(self, v: int, pageno: int, lsn: int) -> None:
        m = self._maps.get(v)
        entry = m.rows.get(pageno) if m is not None else None
        if m is not None and entry is not None and entry[0] == lsn:
            del m.rows[pageno]

    def _stamp_usage(self) -> None:
        """Record the reads the volumes remember since the last pass, with their times."""
        with self._lock:
            recents = [(v, recent()) for v, recent in self._usage.items()]
        for v, used in recents:
            self._db.executemany(
                "UPDATE pages SET used=max(used, ?) WHERE v=? AND pageno=? AND lsn=?",
                ((when, v, p, lsn) for p, lsn, when in used),
            )
