"""What the processes sharing one cache directory share besides the store file.

A change signal (eight bytes in a memory map that change whenever a process changes the
store), a writer lock per volume (an flock), and the pin table: the snapshots readers
in every process still read, which maintenance (``maintenance.Maintenance``) keeps.
Each costs a memory access or a lock on the hot path, never a system call per read.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading

from graft_vfs.core.errors import StorageError

PIN_SLOTS = 4096  # connections open at once, over all processes sharing a cache directory
NO_PIN = 2**64 - 1


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
