"""``graft_vfs.Volume``: a volume as 4 KiB pages and bytes, for data that is not SQLite.

A volume is a sequence of 4096-byte pages versioned by LSN; SQLite is one way to fill
it, and this is another: read and write pages or byte ranges, commit them atomically,
push, pull, and read a snapshot at a past LSN. Reads are as lazy as SQL's and checked
the same way: every page comes through the volume's read path (memory, local cache,
then the server, with what its prefetch adds), or, for a past snapshot the local log
no longer holds, from the same ``Remote.read_pages``; each frame is checked against
its checksum before anything keeps it.

Pages are numbered from 0: page ``n`` holds bytes ``n * 4096`` to ``(n + 1) * 4096``
(the VFS's page 0 is SQLite's page 1). A volume's size is a whole number of pages: it
keeps no byte length, so data whose length is not a multiple of 4096 records its
length itself (in a header page of its own, say). Reads past the end are short, as
from a file; writes past the end grow the volume, the pages between reading as zeros.

None of the VFS's SQLite-specific handling applies here: page 0 is read and written as
it is (the VFS serves SQLite's change counter in it from the LSN and refuses a page 1
of another page size; neither happens through this API). A volume written this way is
no SQLite database, and SQL on it fails as on any file that is not one.

A ``Volume`` opened with the same ``(remote, cache_dir)`` as ``graft_vfs.connect`` in
the same process is the same client: it shares the local cache, background sync and
the volume's writer lock, so a ``write()`` waits for (or is refused by) a SQL write
transaction on the same volume and the other way round, in this process and others.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pyroaring import BitMap

from graft_vfs.client import api
from graft_vfs.client.runtime import Options, Runtime
from graft_vfs.client.sync import MAX_READ_SET
from graft_vfs.client.volume import Volume as ClientVolume
from graft_vfs.core.errors import (
    Busy,
    InvalidRequest,
    ReadOnly,
    SnapshotNotFound,
    VolumeNotFound,
)
from graft_vfs.core.graft import MAX_PAGES
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.pages import ZERO_PAGE

# The largest byte offset a volume can hold (its page numbers are 32-bit).
MAX_SIZE = MAX_PAGES * PAGE_SIZE
# Pages of a past snapshot the local log no longer holds, kept in memory per snapshot,
# and fetched at most this many in one request when a range read misses.
PAST_CACHE_PAGES = 1024
PAST_BATCH = 256
DEFAULT_WRITE_TIMEOUT = 5.0  # seconds write() waits for another writer to finish
_WAIT_FIRST, _WAIT_MAX = 0.001, 0.05  # its polling pause, doubling


def _client(
    remote: str | None, cache_dir: str | None, options: Options | None
) -> tuple[str, Runtime]:
    """The client ``graft_vfs.connect`` uses for ``(remote, cache_dir)`` (registered if new),
    and the name it is registered under."""
    name = api.client_for(remote, cache_dir, options)
    return name, api.runtime_of(name)


def _check_range(offset: int, length: int) -> None:
    for what, value in (("offset", offset), ("length", length)):
        if type(value) is not int or value < 0:  # a bool is no offset
            raise InvalidRequest(f"{what}={value!r}: give an integer >= 0")
    if offset + length > MAX_SIZE:
        raise InvalidRequest(
            f"offset {offset} + length {length} is past the largest volume ({MAX_SIZE} bytes)"
        )


def _check_page(pageno: int) -> None:
    if type(pageno) is not int or not 0 <= pageno < MAX_PAGES:
        raise InvalidRequest(f"page {pageno!r}: give a page number from 0 to {MAX_PAGES - 1}")


def _gather(read: Callable[[int], bytes], page_count: int, offset: int, length: int) -> bytes:
    """Bytes ``offset`` to ``offset + length`` of pages ``read(n)``, cut at the end."""
    end = min(offset + length, page_count * PAGE_SIZE)
    out = bytearray()
    while offset < end:
        pageno, within = divmod(offset, PAGE_SIZE)
        take = min(end - offset, PAGE_SIZE - within)
        data = read(pageno)
        out += data if take == PAGE_SIZE else data[within : within + take]
        offset += take
    return bytes(out)


class _Reads:
    """The read API of a volume, a snapshot and a write transaction alike."""

    page_count: int

    def _read(self, pageno: int) -> bytes:
        raise NotImplementedError

    def _reading(self) -> _Reads:
        """A consistent view for one call (the latest snapshot, pinned, for a Volume)."""
        return self

    def _done(self, view: _Reads) -> None:
        return None

    def _span(self, first: int, stop: int) -> None:
        """Pages ``first`` to ``stop - 1`` are about to be read (a hint for fetches)."""
        return None

    @property
    def size(self) -> int:
        """The size in bytes: ``page_count * 4096``."""
        return self.page_count * PAGE_SIZE

    def read_page(self, pageno: int) -> bytes:
        """Page ``pageno`` (4096 bytes); InvalidRequest past the last page."""
        _check_page(pageno)
        view = self._reading()
        try:
            if pageno >= view.page_count:
                raise InvalidRequest(
                    f"page {pageno} is past the end of the volume ({view.page_count} pages): "
                    "read pages 0 to page_count - 1"
                )
            return view._read(pageno)
        finally:
            self._done(view)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; fewer (maybe none) past the end, as from a file."""
        _check_range(offset, length)
        view = self._reading()
        try:
            view._span(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))
            return _gather(view._read, view.page_count, offset, length)
        finally:
            self._done(view)


class _Pinned(_Reads):
    """One pinned snapshot of a volume: the local ``(lsn, page_count)``, or a remote LSN."""

    def __init__(
        self,
        vol: ClientVolume,
        snap: tuple[int, int],
        remote_lsn: int | None,
        token: object | None = None,
    ) -> None:
        self._vol = vol
        self.token = token  # the owner of its pin, if pinned
        self.lsn_local, self.page_count = snap
        self._remote_lsn = remote_lsn  # a past snapshot the local log does not hold
        self._past: OrderedDict[int, bytes] = OrderedDict()
        self._stop = 0  # the end of the range being read (a hint, see _span)

    def _span(self, first: int, stop: int) -> None:
        self._stop = stop

    def _read(self, pageno: int) -> bytes:
        if self._remote_lsn is None:
            return self._vol.reads.read_page(pageno, self.lsn_local)
        data = self._past.get(pageno)
        if data is None:
            stop = min(self._stop, self.page_count, pageno + PAST_BATCH)
            self._fetch_past([p for p in range(pageno, stop) if p not in self._past] or [pageno])
            data = self._past[pageno]
        self._past.move_to_end(pageno)
        return data

    def _fetch_past(self, pages: list[int]) -> None:
        """Fetch ``pages`` of the past snapshot in one request, verified as every read."""
        assert self._remote_lsn is not None
        got = self._vol.read_remote_pages(pages, self._remote_lsn)
        for pageno in pages:
            self._past[pageno] = got[pageno]
            self._past.move_to_end(pageno)
        while len(self._past) > PAST_CACHE_PAGES:
            self._past.popitem(last=False)


class Snapshot(_Reads):
    """A read-only view of a volume at one LSN, kept readable until ``close()``.

    ``lsn`` is the server LSN it shows (None: a snapshot of local commits not pushed
    yet); ``page_count``, ``size``, ``read_page`` and ``read`` as on a ``Volume``.
    """

    def __init__(self, owner: Volume, view: _Pinned, lsn: int | None, token: object) -> None:
        self._owner = owner
        self._view: _Pinned | None = view
        self._token: object | None = token  # pins the local snapshot while it lives
        self.lsn = lsn
        self.page_count = view.page_count

    def _reading(self) -> _Reads:
        if self._view is None:
            raise InvalidRequest("this snapshot is closed: take a new one with Volume.snapshot()")
        return self._view

    def write(self, *args: Any, **kwargs: Any) -> Writer:
        raise ReadOnly(
            "a snapshot is read-only: write through the Volume (vol.write()), which writes "
            "on its latest snapshot"
        )

    def close(self) -> None:
        """Let the local cache's maintenance drop what only this snapshot read."""
        self._view = None
        self._token = None  # its finalizer releases the pin

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Writer(_Reads):
    """A write transaction (``Volume.write()``): buffered, one local commit at its end.

    It reads its own writes. Leaving the ``with`` block commits every change as one
    local commit (one LSN, then ``lsn``), atomically; an exception leaves nothing.
    """

    def __init__(self, owner: Volume, timeout: float) -> None:
        self._owner = owner
        self._timeout = timeout
        self._vol: ClientVolume | None = None
        self._base: tuple[int, int] = (0, 0)
        self._dirty: dict[int, bytes] = {}
        self._reads: BitMap | None = None
        self.page_count = 0
        self._floor = 0  # the fewest pages the volume had during the transaction
        self.lsn: int | None = None  # the local LSN after the commit
        self.committed = False  # whether the end made a new commit (False: no change)
        self._open = False
        self._used = False

    # -- the transaction --------------------------------------------------------------

    def __enter__(self) -> Writer:
        if self._used:
            raise InvalidRequest("a Writer runs once: start another with vol.write()")
        self._used = True
        vol = self._owner._volume()
        deadline = time.monotonic() + self._timeout
        pause = _WAIT_FIRST
        while not vol.acquire_writer():
            if time.monotonic() >= deadline:
                raise Busy(
                    f"volume {vol.vid!r} has another writer (a SQL transaction or a "
                    f"Volume.write()) after {self._timeout:g} s: retry, or give a longer "
                    "write(timeout=)"
                )
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_MAX)
        try:
            self._owner._catch_up()
            vol.reload()  # the latest snapshot, whichever process made it
            self._base = vol.pin(self)
        except BaseException:
            vol.release_writer()
            raise
        self._vol = vol
        self.page_count = self._floor = self._base[1]
        self._reads = BitMap() if self._owner._runtime.options.rebase else None
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        vol = self._vol
        if vol is None:
            return
        try:
            if exc is None:
                self._commit(vol)
        finally:
            self._open = False
            self._dirty = {}
            vol.unpin(self)
            vol.release_writer()

    def _commit(self, vol: ClientVolume) -> None:
        base_lsn, base_count = self._base
        count = self.page_count
        changed: dict[int, bytes] = {}
        for pageno, data in self._dirty.items():
            if pageno >= count:
                continue
            if pageno < base_count:
                old = vol.peek_page(pageno, base_lsn)
                if old == data:
                    continue  # written back as it was: not a change
            changed[pageno] = data
        for pageno in range(base_count, count):
            changed.setdefault(pageno, ZERO_PAGE)  # a growing commit carries every new page
        if not changed and count == base_count:
            self.lsn = base_lsn
            return
        reads = self._reads
        if reads is not None and len(reads) > MAX_READ_SET:
            reads = None  # too many to keep: this commit will not be rebased
        # Busy if a pull or reset moved the volume on since the transaction began.
        self.lsn = vol.commit(base_lsn, changed, count, reads)[0]
        self.committed = True

    def _live(self) -> ClientVolume:
        if not self._open or self._vol is None:
            raise InvalidRequest("write inside `with vol.write() as w:`, before it ends")
        return self._vol

    # -- reads see the transaction's writes --------------------------------------------

    def _read(self, pageno: int) -> bytes:
        vol = self._live()
        data = self._dirty.get(pageno)
        if data is not None:
            return data
        if self._reads is not None:
            self._reads.add(pageno)
        if pageno >= self._floor:
            return ZERO_PAGE  # (every such page in the volume is in _dirty: see _put)
        return vol.reads.read_page(pageno, self._base[0])

    def _reading(self) -> _Reads:
        self._live()
        return self

    # -- writes -----------------------------------------------------------------------

    def write_page(self, pageno: int, data: bytes) -> None:
        """Replace page ``pageno`` with ``data`` (exactly 4096 bytes); grows the volume."""
        self._live()
        _check_page(pageno)
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != PAGE_SIZE:
            size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
            raise InvalidRequest(
                f"a page is {PAGE_SIZE} bytes, got "
                + (f"{size}" if size is not None else f"a {type(data).__name__}")
                + ": use write(offset, data) for byte ranges"
            )
        self._put(pageno, bytes(data))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at byte ``offset``; past the end grows the volume (zeros between)."""
        self._live()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidRequest(f"write takes bytes, not a {type(data).__name__}")
        data = bytes(data)
        _check_range(offset, len(data))
        end = offset + len(data)
        view = memoryview(data)
        while view:
            pageno, within = divmod(offset, PAGE_SIZE)
            take = min(len(view), PAGE_SIZE - within)
            if take == PAGE_SIZE:
                page = bytes(view[:take])
            else:
                old = self._read(pageno) if pageno < self.page_count else ZERO_PAGE
                page = old[:within] + bytes(view[:take]) + old[within + take :]
            self._put(pageno, page)
            view = view[take:]
            offset += take
        assert offset == end

    def truncate(self, size: int) -> None:
        """Make the volume ``size`` bytes, rounded up to whole pages, the rest zeros.

        Shrinking drops the pages past the end; growing adds zero pages; the bytes of
        the last page from ``size`` on become zeros either way.
        """
        self._live()
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            raise InvalidRequest(f"size={size!r}: give a number of bytes, 0 to {MAX_SIZE}")
        count, within = divmod(size, PAGE_SIZE)
        if within:
            last = self._read(count) if count < self.page_count else ZERO_PAGE
            self._put(count, last[:within] + bytes(PAGE_SIZE - within))
            count += 1
        elif count > self.page_count:
            self._put(count - 1, ZERO_PAGE)
        for pageno in [p for p in self._dirty if p >= count]:
            del self._dirty[pageno]
        self.page_count = count
        # Pages cut off and grown again read as zeros, not as the base's.
        self._floor = min(self._floor, count)

    def _put(self, pageno: int, data: bytes) -> None:
        # Every page from the base's end (or the shortest the volume was) to the end
        # is in _dirty, so the commit carries each new page and none reads the base.
        if pageno >= self.page_count:
            for gap in range(self.page_count, pageno):
                self._dirty.setdefault(gap, ZERO_PAGE)
            self.page_count = pageno + 1
        self._dirty[pageno] = data


class Volume(_Reads):
    """A volume as pages and bytes (see the module); ``Volume.open(name, ...)`` opens one.

    ``lsn`` is the local LSN of the latest snapshot, ``remote_lsn`` the server LSN the
    cache has; ``page_count`` and ``size`` are the latest snapshot's. Each read sees the
    latest snapshot as of its call; ``snapshot()`` keeps one for several reads.
    """

    def __init__(self, client_name: str, runtime: Runtime, vol: ClientVolume) -> None:
        self._runtime = runtime
        self._vol: ClientVolume | None = vol
        self.name = vol.vid
        # The name its client is registered under, as con.open_vfs of a connect() to the
        # same (remote, cache_dir): graft_vfs.unregister(client_name) stops that client.
        self.client_name = client_name
        self._tokens = threading.local()  # each thread's pin owner for reads

    @classmethod
    def open(
        cls,
        name: str,
        *,
        remote: str | None = None,
        cache_dir: str | None = None,
        create: bool = True,
        options: Options | None = None,
    ) -> Volume:
        """Open volume ``name``, as ``graft_vfs.connect`` would (same defaults, same client).

        Only its metadata is fetched; pages come when read. ``create=False`` refuses a
        volume that exists neither in the cache nor on the server (VolumeNotFound).
        """
        client_name, runtime = _client(remote, cache_dir, options)
        try:
            vol = runtime.volume(name, create=create)
        except VolumeNotFound as exc:
            raise VolumeNotFound(
                f"volume {name!r} exists neither in {runtime.cache_dir} nor on "
                f"{runtime.remote.url if runtime.remote else 'any server'}: "
                "Volume.open(..., create=True) creates it"
            ) from exc
        return cls(client_name, runtime, vol)

    def _volume(self) -> ClientVolume:
        if self._vol is None:
            raise InvalidRequest(f"volume {self.name!r} is closed: open it again")
        return self._vol

    def _catch_up(self) -> None:
        runtime = self._runtime
        if runtime.signal.value() != runtime.seen_signal:
            runtime.catch_up()  # another process changed the cache directory

    # -- the latest snapshot ------------------------------------------------------------

    @property
    def lsn(self) -> int:
        self._catch_up()
        return self._volume().snapshot[0]

    @property
    def remote_lsn(self) -> int:
        return self._volume().refresh().remote_lsn

    @property
    def page_count(self) -> int:  # type: ignore[override]
        self._catch_up()
        return self._volume().snapshot[1]

    def _reading(self) -> _Reads:
        self._catch_up()
        vol = self._volume()
        # One pin owner per thread, kept: its slot in the pin table is taken once.
        token = getattr(self._tokens, "token", None)
        if token is None:
            token = self._tokens.token = _Token()
        return _Pinned(vol, vol.pin(token), None, token)

    def _done(self, view: _Reads) -> None:
        assert isinstance(view, _Pinned)
        self._volume().unpin(view.token)

    def snapshot(self, lsn: int | None = None) -> Snapshot:
        """A read-only view at server LSN ``lsn`` (as ``connect(lsn=)``), or at the latest.

        A past LSN still in the local log reads through the cache; an older one reads
        its pages from the server (SnapshotNotFound if it has no such LSN).
        """
        self._catch_up()
        vol = self._volume()
        token = _Token()
        if lsn is None:
            snap = vol.pin(token, vol.snapshot)
            row = vol.refresh()
            remote = row.remote_lsn if row.local_lsn == snap[0] and not row.pending else None
            return Snapshot(self, _Pinned(vol, snap, None), remote, token)
        if type(lsn) is not int or lsn < 0:
            raise SnapshotNotFound(f"lsn={lsn!r}: give a server LSN, an integer >= 0")
        found = vol.local_snapshot_of(lsn)
        if found is not None:
            snap = vol.pin(token, found)
            return Snapshot(self, _Pinned(vol, snap, None), lsn, token)
        entry = self._runtime.require_remote().log_entry(vol.vid, lsn) if lsn else None
        if entry is None:
            raise SnapshotNotFound(f"volume {vol.vid!r} has no LSN {lsn} on the server")
        view = _Pinned(vol, (lsn, int(entry["page_count"])), lsn)
        return Snapshot(self, view, lsn, token)

    # -- writes and sync ----------------------------------------------------------------

    def write(self, timeout: float = DEFAULT_WRITE_TIMEOUT) -> Writer:
        """A write transaction: ``with vol.write() as w: w.write(offset, data)``.

        It waits up to ``timeout`` seconds for another writer of the volume (a SQL
        transaction, another ``write()``, in any process), then raises Busy.
        """
        self._volume()
        if not 0 <= timeout <= 24 * 3600:
            raise InvalidRequest(f"timeout={timeout!r}: give seconds, 0 to 86400")
        return Writer(self, timeout)

    def push(self) -> dict[str, Any]:
        """Push local commits now (as ``PRAGMA graft_push``); Diverged if the server moved on."""
        return self._volume().sync.push()

    def pull(self) -> dict[str, Any]:
        """Take the server's latest snapshot (as ``PRAGMA graft_pull``): metadata, no pages."""
        return self._volume().sync.pull()

    def reset(self) -> dict[str, Any]:
        """Discard local commits not pushed and take the server's latest (``graft_reset``)."""
        return self._volume().sync.reset()

    def status(self) -> dict[str, Any]:
        """As ``PRAGMA graft_status``."""
        return self._volume().status()

    def stats(self) -> dict[str, int]:
        """As ``PRAGMA graft_stats``: pages and bytes fetched, cache hits, pushes..."""
        return self._volume().counters()

    def close(self) -> None:
        """End this handle; the client (its cache, background push) stays, as connect()'s."""
        self._vol = None
        self._tokens = threading.local()  # every thread's pin owner goes with the old one

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._vol is None else f"lsn={self._vol.snapshot[0]}"
        return f"<graft_vfs.Volume {self.name!r} {state}>"


class _Token:
    """The owner of a pin: a pinned snapshot stays readable while its token lives."""
