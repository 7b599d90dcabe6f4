"""The local store's page file: cached page data at fixed 4 KiB slots, beside the SQLite file.

A page row of the store (``rows``) names its slot; the bytes live here, written with
``pwrite`` and read with ``pread``, so a page costs one 4 KiB write instead of a B-tree
leaf cell and an overflow page in the WAL, copied again by the checkpoint. Which slots
are taken or free is the store's to say, in its transactions (``free_slots``, the
``page_file`` row); this file only moves bytes, and syncs it (``sync``),
because a row naming a slot must never be durable before the slot's bytes are.

Nothing read here is trusted: the caller checks each page against its row's checksum,
which covers the volume, page and LSN, so a slot reused meanwhile, a file truncated or
overwritten, or missing, reads as a mismatch, never as another page's data.
"""

from __future__ import annotations

import os
import threading

from graft_vfs.core.ids import PAGE_SIZE

PAGES_FILE = "graft-cache.pages"


class PageFile:
    """One open page file; thread-safe (``pread``/``pwrite`` take no file position)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.existed = os.path.exists(path)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._dirty = False  # written since the last sync (by this process)
        self._sync_lock = threading.Lock()

    def write(self, slots: list[int], pages: list[bytes]) -> None:
        """Write ``pages[i]`` at ``slots[i]``; neighbouring slots in one system call."""
        i = 0
        while i < len(slots):
            j = i + 1
            while j < len(slots) and slots[j] == slots[j - 1] + 1:
                j += 1
            data = pages[i] if j == i + 1 else b"".join(pages[i:j])
            written = os.pwrite(self._fd, data, slots[i] * PAGE_SIZE)
            if written != len(data):
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
            i = j
        # Flagged after the bytes are written: a sync that clears the flag before this
        # write started either covers the write or leaves the flag set (see ``sync``).
        self._dirty = True

    def read(self, slot: int, count: int = 1) -> bytes:
        """``count`` slots from ``slot`` (shorter if the file ends first: checked by the caller)."""
        return os.pread(self._fd, count * PAGE_SIZE, slot * PAGE_SIZE)

    def sync(self, *, shared: bool = False) -> None:
        """Make every page written so far durable (``fdatasync``), if this process wrote any.

        ``shared``: whatever any process wrote, which this process cannot know, so always
        (a sync with nothing to write costs about 50 us). A commit that syncs the WAL
        makes the rows other processes committed unsynced durable too.
        """
        if not (self._dirty or shared):
            return
        with self._sync_lock:
            if self._dirty or shared:
                self._dirty = False
                os.fdatasync(self._fd)

    def truncate(self, slots: int) -> None:
        """Cut the file to ``slots`` slots (every slot from there on is free)."""
        if os.fstat(self._fd).st_size > slots * PAGE_SIZE:
            os.ftruncate(self._fd, slots * PAGE_SIZE)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self._fd)


class SlotMap:
    """Where one volume's pages are in the page file, in memory: ``page -> (lsn, slot, crc)``.

    Each entry is the page's latest row at or before ``known`` (a local LSN), so it
    answers a read at any snapshot from the entry's LSN to ``known``; older snapshots,
    and pages without an entry (markers, rows with inline data, pages not read yet),
    are read with SQL. The store keeps it: entries are added when SQL reads a row at
    ``known`` or this process commits on top of ``known``, and ``known`` moves on by
    dropping the pages the local log says changed since (``LocalStore._slot_map``), so
    another process's commits reach it through the log. An entry whose slot was freed
    and taken again fails the row's checksum and is dropped: the read goes to SQL.
    """

    __slots__ = ("known", "rows")

    def __init__(self, known: int) -> None:
        self.known = known
        self.rows: dict[int, tuple[int, int, int]] = {}
