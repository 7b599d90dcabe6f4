"""The client's public entry points: register the VFS, connect to a volume, flush at exit.

Re-exported by ``graft_vfs`` (``graft_vfs.register``, ``graft_vfs.connect``...).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import threading
import urllib.parse

import apsw

from graft_vfs.client.runtime import Options, Runtime
from graft_vfs.client.vfs import GraftVFS, to_sqlite
from graft_vfs.core.errors import InvalidVolumeId
from graft_vfs.core.ids import validate_volume_id

DEFAULT_VFS = "graft"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "graft")

_registered: dict[str, GraftVFS] = {}
_lock = threading.Lock()


def register(
    remote: str | None = None,
    cache_dir: str | None = None,
    *,
    name: str = DEFAULT_VFS,
    options: Options | None = None,
) -> Runtime:
    """Register the graft VFS under ``name`` (default ``"graft"``) and return its runtime.

    ``remote`` is the graft server URL (default: ``$GRAFT_REMOTE``; none means local-only
    volumes). ``cache_dir`` holds the durable local store (default: ``$GRAFT_CACHE_DIR``,
    else ``~/.cache/graft``). The bearer token is ``options.token``, else ``$GRAFT_TOKEN``.
    Registering a name again replaces its earlier client.
    """
    remote = remote if remote is not None else os.environ.get("GRAFT_REMOTE") or None
    cache_dir = cache_dir or os.environ.get("GRAFT_CACHE_DIR") or DEFAULT_CACHE_DIR
    options = options or Options()
    if options.token is None and os.environ.get("GRAFT_TOKEN"):
        options = dataclasses.replace(options, token=os.environ["GRAFT_TOKEN"])
    with _lock:
        old = _registered.pop(name, None)
        if old is not None:
            _close(old)
        vfs = GraftVFS(name, Runtime(remote, os.path.abspath(cache_dir), options))
        _registered[name] = vfs  # apsw unregisters a VFS when it is garbage-collected
        return vfs.runtime


def unregister(name: str = DEFAULT_VFS) -> None:
    """Unregister a VFS and stop its background sync (pending commits stay durable)."""
    with _lock:
        vfs = _registered.pop(name, None)
    if vfs is not None:
        _close(vfs)


def _close(vfs: GraftVFS) -> None:
    vfs.runtime.close()
    vfs.unregister()


def connect(
    volume: str,
    *,
    remote: str | None = None,
    cache_dir: str | None = None,
    readonly: bool = False,
    lsn: int | None = None,
    create: bool = True,
    options: Options | None = None,
    min_lsn: int | None = None,
    min_lsn_timeout: float | None = None,
    at: str | None = None,
) -> apsw.Connection:
    """Open ``volume`` with ``journal_mode=MEMORY``; a shortcut around register().

    Each distinct (remote, cache_dir) pair is its own client, with its own local store
    and sync state, even within one process; its ``options`` (the token among them,
    default ``$GRAFT_TOKEN``) are those of its first connect(). ``lsn`` opens a read-only
    past snapshot. ``create=False`` refuses a volume that exists neither in the cache
    nor on the server (``apsw.CantOpenError`` caused by ``VolumeNotFound``).
    ``at`` (ISO 8601, or a time ago such as ``5m``) opens, read-only, the latest LSN
    committed at or before that time. ``min_lsn`` (read your writes) pulls until the
    cache has that remote LSN or later, waiting up to ``min_lsn_timeout`` seconds
    (default 30; then ``LsnNotReached``).
    """
    try:
        # SQLite reads an empty name as a private temporary database: never a volume.
        validate_volume_id(volume)
    except InvalidVolumeId as exc:
        raise to_sqlite(exc) from exc
    name = client_for(remote, cache_dir, options)
    flags = apsw.SQLITE_OPEN_URI
    if readonly or lsn is not None or at is not None:
        flags |= apsw.SQLITE_OPEN_READONLY
    else:
        flags |= apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    params = [] if lsn is None else [f"lsn={int(lsn)}"]
    if at is not None:
        params.append(f"at={urllib.parse.quote(at)}")
    if min_lsn is not None:
        params.append(f"min_lsn={int(min_lsn)}")
    if min_lsn_timeout is not None:
        params.append(f"min_lsn_timeout={float(min_lsn_timeout)!r}")
    uri = f"file:{volume}" + ("?" + "&".join(params) if params else "")
    con = apsw.Connection(uri, flags=flags, vfs=name)  # con.open_vfs names the client
    con.execute("PRAGMA journal_mode=MEMORY").fetchall()
    return con


def client_for(remote: str | None, cache_dir: str | None, options: Options | None) -> str:
    """The VFS name of the client for ``(remote, cache_dir)`` (defaults from the
    environment), registered with ``options`` if new: one client per pair, per process."""
    remote = remote if remote is not None else os.environ.get("GRAFT_REMOTE") or None
    cache_dir = os.path.abspath(cache_dir or os.environ.get("GRAFT_CACHE_DIR") or DEFAULT_CACHE_DIR)
    key = hashlib.sha1(f"{remote}\0{cache_dir}".encode()).hexdigest()[:12]
    name = f"graft-{key}"
    with _lock:
        known = name in _registered
    if not known:
        register(remote, cache_dir, name=name, options=options)
    return name


def runtime_of(name: str = DEFAULT_VFS) -> Runtime:
    """The runtime behind a registered VFS name."""
    with _lock:
        return _registered[name].runtime


@atexit.register
def _flush_at_exit() -> None:
    # Local commits are durable either way; this only spares a short-lived program's
    # commits a wait for its next run before they reach the server.
    for vfs in list(_registered.values()):
        try:
            vfs.runtime.flush(timeout=float(os.environ.get("GRAFT_EXIT_FLUSH_SECONDS", "10")))
        except Exception:
            pass
