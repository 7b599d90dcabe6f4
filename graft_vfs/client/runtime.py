"""The runtime: one per (remote, cache directory) client; opens volumes, schedules their sync."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from graft_vfs.client.local import LocalStore
from graft_vfs.client.remote import Remote, RemoteHead, Traffic, required
from graft_vfs.client.volume import Volume
from graft_vfs.core.errors import (
    Diverged,
    Forbidden,
    GraftError,
    InvalidRequest,
    RemoteError,
    Unauthorized,
    VolumeNotFound,
)
from graft_vfs.core.ids import validate_volume_id

log = logging.getLogger("graft_vfs")

# Pages a volume new to the cache asks for with its snapshot (Remote.opening): page 1,
# the schema, the statistics tables and the upper levels of the B-trees, so a cold
# client's first query starts at its leaves. 256 pages are at most 1 MiB uncompressed.
OPENING_PAGES = 256

# Retrying cannot help until someone changes the token or its scope.
ACCESS_DENIED = (Unauthorized, Forbidden)


@dataclass(frozen=True)
class Options:
    """Client settings; every field has a sensible default."""

    cache_pages: int = 16384  # in-memory page cache per volume (64 MiB)
    autopush: bool = True  # push local commits in the background
    push_delay: float = 0.0  # seconds to wait for more commits to roll up into one push
    pull_interval: float | None = None  # pull in the background every N seconds
    timeout: float = 30.0
    token: str | None = field(default=None, repr=False)  # bearer token; never printed
    cache_max_bytes: int | None = None  # page data the cache directory keeps; None: no limit
    # Fetch the B-tree being read in the background, below demand reads in priority.
    # None (auto): where the link's round-trip floor is >= 15 ms and a round trip carries
    # >= 512 KB (an edge link; not a loopback or LAN, nor a narrow, often metered link).
    background_fetch: bool | None = None
    # Rebase a rejected push onto the server's new head when no page the local
    # transactions read changed there (see sync.Sync.rebase); else diverged, as without.
    rebase: bool = False

    def __post_init__(self) -> None:
        limit = self.cache_max_bytes
        if limit is not None and (type(limit) is not int or limit < 0):  # a bool is no size
            raise InvalidRequest(
                f"cache_max_bytes={limit!r}: give a number of bytes >= 0, or None for no limit"
            )


class Runtime:
    """A client: a local store plus a server; independent of any other runtime."""

    def __init__(self, remote: str | None, cache_dir: str, options: Options | None = None) -> None:
        self.options = options or Options()
        self.cache_dir = cache_dir
        self.remote = (
            Remote(remote, timeout=self.options.timeout, token=self.options.token)
            if remote
            else None
        )
        self.local = LocalStore(cache_dir, self.options.cache_max_bytes)
        self.signal = self.local.signal
        self.seen_signal = self.signal.value()
        self._volumes: dict[str, Volume] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._dirty: set[str] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def require_remote(self) -> Remote:
        return required(self.remote)

    def volume(self, vid: str, *, create: bool) -> Volume:
        """Open a volume; one never seen here is bootstrapped from the server's metadata."""
        validate_volume_id(vid)
        with self._lock:
            vol = self._volumes.get(vid)
            if vol is not None:
                return vol
            row = self.local.load_volume(vid)
            known = row is not None
            opening: dict[int, tuple[int, bytes]] = {}
            traffic = Traffic()
            if row is None:
                snap, opening = self._remote_snapshot(vid, create, traffic)
                row = self.local.create_volume(vid, snap.lsn, snap.page_count, snap.identity)
                if opening and (row.local_lsn, row.remote_lsn) == (1, snap.lsn):
                    # Bootstrapped here at local LSN 1: what every first query reads.
                    self.local.store_fetched(
                        row.row_id, [(p, 1, data) for p, (_, data) in opening.items()]
                    )
            vol = Volume(row, self.local, self.remote, self.schedule_push, self.options.cache_pages)
            vol.stats.count(traffic)
            vol.stats.add(pages_fetched=len(opening))
            vol.reads.background = self.options.background_fetch
            vol.sync.rebase = self.options.rebase
            if known:
                self._check_identity(vol)
            row = vol.row
            self._volumes[vid] = vol
        if self.options.pull_interval and self.remote is not None:
            self._ensure_thread()
        if row.pending or row.push_intent:
            self.schedule_push(vol)  # commits left by an earlier process
        return vol

    def _check_identity(self, vol: Volume) -> None:
        """At open, compare the server's identity of the volume with the cache's.

        A clean cache of another identity is refilled here; one with local commits
        opens (its data stays readable, like a diverged volume's) and every exchange
        with the server is refused until ``graft reset --force``. A server that cannot
        answer now is checked at the next pull, and every page read names the
        identity it expects, so nothing is ever taken from another volume.
        """
        if self.remote is None:
            return
        try:
            snap = self.remote.snapshot(vol.vid)
        except (RemoteError, VolumeNotFound, *ACCESS_DENIED):
            return
        vol.sync.check_identity(snap)

    def _remote_snapshot(
        self, vid: str, create: bool, traffic: Traffic
    ) -> tuple[RemoteHead, dict[int, tuple[int, bytes]]]:
        """The server's snapshot of a volume new to this cache, with its opening pages."""
        if self.remote is None:
            if create:
                return RemoteHead(vid, 0, 0), {}
            raise VolumeNotFound(f"volume {vid!r} is not in the local cache {self.cache_dir}")
        try:
            return self.remote.opening(vid, OPENING_PAGES, traffic)
        except VolumeNotFound:
            if create:
                return RemoteHead(vid, 0, 0), {}
            raise VolumeNotFound(
                f"volume {vid!r} does not exist on {self.remote.url} nor in {self.cache_dir}; "
                "open it read-write with SQLITE_OPEN_CREATE to create it"
            ) from None

    def catch_up(self) -> None:
        """Reload every open volume after another process changed the local store."""
        self.seen_signal = self.signal.value()  # first: a change made meanwhile is seen next time
        for vol in self.volumes():
            vol.reload()

    def volumes(self) -> list[Volume]:
        with self._lock:
            return list(self._volumes.values())

    # -- background sync -------------------------------------------------------------

    def schedule_push(self, vol: Volume) -> None:
        if not self.options.autopush or self.remote is None:
            return
        with self._wake:
            self._dirty.add(vol.vid)
            self._wake.notify()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._wake:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._sync_loop, name="graft-sync", daemon=True
                )
                self._thread.start()

    def _sync_loop(self) -> None:
        backoff = 0.5
        while True:
            with self._wake:
                if not self._dirty and not self._closed:
                    self._wake.wait(self.options.pull_interval)  # None: until notified
                if self._closed:
                    return
                dirty, self._dirty = self._dirty, set()
            if dirty and self.options.push_delay:
                time.sleep(self.options.push_delay)
            retry = False
            for vol in self.volumes():
                try:
                    if vol.vid in dirty:
                        vol.sync.push()
                    if self.options.pull_interval:
                        vol.sync.pull()
                    vol.sync.last_error = None
                except Diverged as exc:
                    vol.sync.last_error = str(exc)  # the user decides: nothing to retry
                except ACCESS_DENIED as exc:
                    if vol.sync.last_error != f"{type(exc).__name__}: {exc}":
                        log.warning("graft: background sync of %s refused: %s", vol.vid, exc)
                    vol.sync.last_error = f"{type(exc).__name__}: {exc}"
                except GraftError as exc:
                    vol.sync.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("graft: background sync of %s failed: %s", vol.vid, exc)
                    if vol.vid in dirty:
                        retry = True
                        with self._wake:
                            self._dirty.add(vol.vid)
            if retry:
                with self._wake:
                    self._wake.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            else:
                backoff = 0.5

    def flush(self, timeout: float = 10.0) -> bool:
        """Push every volume's pending commits now; True if nothing is left pending."""
        if self.remote is None:
            return False
        deadline = time.monotonic() + timeout
        for vol in self.volumes():
            while time.monotonic() < deadline:
                try:
                    vol.sync.push()
                    break
                except (Diverged, *ACCESS_DENIED):
                    break
                except GraftError:
                    time.sleep(0.2)
        return all(v.refresh().pending == 0 for v in self.volumes())

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.remote is not None:
            self.remote.close()
        for vol in self.volumes():
            vol.close()
        self.local.close()
