"""The ObjectStore protocol and its implementations: FsStore (a directory) and MemoryStore.

Everything the server keeps lives behind this small interface, so the same server
code runs on a local directory, in memory for unit tests, and on S3 (``S3Store`` in
``server/graft_server/s3store.py``, chosen by ``open_store("s3://bucket/prefix")``). The
one primitive that makes many stateless servers safe on one store is
``put_if_absent``: a create-only write where exactly one concurrent writer wins.

Keys are ``/``-separated paths of ``[A-Za-z0-9._-]`` components; no component may
start with ``.``, which rules out ``..`` and leaves dot-names free for FsStore's
temporary files. Filesystem errors become ``StorageError`` here; a missing key is
not an error (``get`` returns None, ``delete`` does nothing).

Each store says what kind of failure a ``StorageError`` was (``StoreFailure.kind``), and
the server wraps its store in one ``CountingStore``: the single place where the bytes
read and written and the failed calls are counted, whatever the store, for the metrics.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from graft_vfs.core.errors import InvalidRequest, StorageError

MAX_KEY_LENGTH = 1024  # S3's limit, kept everywhere so a key valid here is valid there

_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_TMP_DIR = ".tmp"  # dot-names are never keys, so temporaries cannot collide or be listed
# A temporary older than this belongs to a write that was killed: a live write (of any
# process sharing the directory) renames or removes its temporary within seconds.
TEMPORARY_GRACE = 3600.0


# What a failed store call was, for the metrics (a missing key is an answer, not a failure).
ERROR_KINDS = (
    "timeout",  # no answer in time
    "unavailable",  # the service could not be reached (refused, reset, unresolvable)
    "server_error",  # the service failed or throttled (HTTP 5xx, 429)
    "denied",  # credentials or permissions refused (HTTP 401/403, EACCES)
    "rejected",  # any other refusal of the service (an HTTP 4xx, a missing bucket)
    "io",  # the filesystem failed (EIO, ENOSPC, a symlink loop, ...)
    "other",
)


class StoreFailure(StorageError):
    """A StorageError that says which of ``ERROR_KINDS`` it was."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind if kind in ERROR_KINDS else "other"


def error_kind(exc: BaseException) -> str:
    """The kind of a failed store call: its own, or the one its OS error implies."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind in ERROR_KINDS:
        return kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, ConnectionError):
        return "unavailable"
    if isinstance(exc, OSError):
        return "io"
    return error_kind(exc.__cause__) if exc.__cause__ is not None else "other"


class ObjectStore(Protocol):
    """What the server needs from object storage. Every call is thread-safe."""

    stats: dict[str, int]
    """Call counts: gets, range_gets, puts (put_if_absent included), lists, deletes."""

    def get(self, key: str) -> bytes | None:
        """The whole object, or None if it does not exist."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """Bytes ``[start, start + length)``; shorter if the object ends first; None if missing."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Create or atomically replace an object: readers see the old or the new bytes."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create an object only if the key is free; False (nothing written) if it exists."""
        ...

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        """Every key that starts with ``prefix`` (and is ``> start_after`` if given), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""
        ...

    def check(self) -> None:
        """Raise StorageError, saying what is wrong, unless the store can be used now.

        Cheap (one request at most): the server calls it before it starts listening.
        """
        ...


def validate_key(key: object) -> str:
    """Return ``key`` if it is a safe object key, else raise InvalidRequest."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise InvalidRequest(f"invalid object key {key!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    # A prefix is a key, a key followed by "/", or empty (everything).
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def _after(keys: Iterable[str], start_after: str | None) -> Iterable[str]:
    return keys if start_after is None else (k for k in keys if k > start_after)


def _validate_range(start: int, length: int) -> None:
    if start < 0 or length < 0:
        raise InvalidRequest(f"invalid byte range start={start} length={length}")


class _CallStats:
    """Thread-safe call counters shared by the store implementations."""

    def __init__(self) -> None:
        self.stats = {"gets": 0, "range_gets": 0, "puts": 0, "lists": 0, "deletes": 0}
        self._stats_lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1


class MemoryStore(_CallStats):
    """A dict behind a lock: the store for unit tests (nothing survives the process)."""

    def __init__(self) -> None:
        super().__init__()
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        validate_key(key)
        self._count("gets")
        with self._lock:
            return self._objects.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        validate_key(key)
        _validate_range(start, length)
        self._count("range_gets")
        with self._lock:
            data = self._objects.get(key)
        return None if data is None else data[start : start + length]

    def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        self._count("puts")
        with self._lock:
            self._objects[key] = bytes(data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        validate_key(key)
        self._count("puts")
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = bytes(data)
            return True

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        _validate_prefix(prefix)
        self._count("lists")
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        return sorted(_after(keys, start_after))

    def delete(self, key: str) -> None:
        validate_key(key)
        self._count("deletes")
        with self._lock:
            self._objects.pop(key, None)

    def check(self) -> None:
        pass


@contextmanager
def _storage_errors(op: str, key: str) -> Iterator[None]:
    """The one boundary where filesystem errors become StorageError."""
    try:
        yield
    except OSError as exc:
        raise StoreFailure(f"object store {op} of {key!r} failed: {exc}", error_kind(exc)) from exc


class CountingStore:
    """An ObjectStore that counts what passes through it, whatever the store behind.

    ``read_bytes`` (by operation: ``gets``, ``range_gets``) counts the bytes of the
    objects and ranges returned, ``written_bytes`` (``puts``) the bytes of the objects
    stored (a create that found its key taken stored nothing), and ``errors`` the calls
    that failed, after the store's own retries, by operation and kind (``ERROR_KINDS``).
    A missing key is no error, and a refused key (InvalidRequest) is the caller's.
    Requests themselves are counted by the store (``stats``), which alone sees retries.
    Any other attribute (``presigner``, ``root``, ...) is the wrapped store's.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.stats = inner.stats  # the store's own dict, which it keeps counting in
        self.read_bytes = {"gets": 0, "range_gets": 0}
        self.written_bytes = {"puts": 0}
        self.errors: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CountingStore({self.inner!r})"

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @contextmanager
    def _failures(self, op: str) -> Iterator[None]:
        try:
            yield
        except InvalidRequest:
            raise
        except Exception as exc:
            kind = error_kind(exc)
            with self._lock:
                self.errors[op, kind] = self.errors.get((op, kind), 0) + 1
            raise

    def _add(self, counts: dict[str, int], op: str, size: int) -> None:
        with self._lock:
            counts[op] += size

    def get(self, key: str) -> bytes | None:
        with self._failures("gets"):
            data = self.inner.get(key)
        if data is not None:
            self._add(self.read_bytes, "gets", len(data))
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        with self._failures("range_gets"):
            data = self.inner.get_range(key, start, length)
        if data is not None:
            self._add(self.read_bytes, "range_gets", len(data))
        return data

    def put(self, key: str, data: bytes) -> None:
        with self._failures("puts"):
            self.inner.put(key, data)
        self._add(self.written_bytes, "puts", len(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        with self._failures("puts"):
            created = self.inner.put_if_absent(key, data)
        if created:
            self._add(self.written_bytes, "puts", len(data))
        return created

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        with self._failures("lists"):  # (the call as made: start_after only when given)
            if start_after is None:
                return self.inner.list(prefix)
            return self.inner.list(prefix, start_after)

    def delete(self, key: str) -> None:
        with self._failures("deletes"):
            self.inner.delete(key)

    def check(self) -> None:
        self.inner.check()


def _fsync_dir(path: Path) -> None:
    # A new or renamed directory entry is only durable once its directory is synced.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsStore(_CallStats):
    """Objects as files under a root directory, each key a relative path.

    Writes go to a temporary file that is fsynced, then renamed (``put``) or hard
    linked (``put_if_absent``: ``link`` fails if the name exists, atomically, which
    is the create-only primitive) to its final name, and the directory is fsynced.
    A reader never sees a partial object.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = Path(root).resolve()
        with _storage_errors("creation", str(self.root)):
            (self.root / _TMP_DIR).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FsStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        self._count("gets")
        with _storage_errors("get", key):
            try:
                return path.read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        path = self._path(key)
        _validate_range(start, length)
        self._count("range_gets")
        with _storage_errors("ranged get", key):
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    return f.read(length)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._count("puts")
        with _storage_errors("put", key):
            self._ensure_dir(path.parent)
            tmp = self._write_temp(data)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        self._count("puts")
        with _storage_errors("create", key):
            self._ensure_dir(path.parent)
            tmp = self._write_temp(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return True

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        _validate_prefix(prefix)
        self._count("lists")
        # Only the directory named by the prefix's complete components is scanned,
        # and within it only names that start with the partial last component.
        dir_key, _, partial = prefix.rpartition("/")
        start = self.root / dir_key if dir_key else self.root
        with _storage_errors("list", prefix):
            keys = _walk_keys(start, f"{dir_key}/" if dir_key else "", partial)
            return sorted(_after(keys, start_after))

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._count("deletes")
        with _storage_errors("delete", key), suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()

    def check(self) -> None:
        tmp = self.root / _TMP_DIR
        with _storage_errors("check", str(self.root)):
            if not tmp.is_dir():
                raise FileNotFoundError(f"{tmp} is missing")
            if not os.access(self.root, os.W_OK | os.X_OK) or not os.access(tmp, os.W_OK):
                raise PermissionError(f"{self.root} is not writable by this user")

    def remove_stale_temporaries(self, older_than: float, now: float | None = None) -> int:
        """Delete temporaries last modified more than ``older_than`` seconds ago (left
        by writers that were killed mid-write); return how many."""
        now = time.time() if now is None else now
        removed = 0
        with _storage_errors("cleanup", _TMP_DIR):
            for entry in os.scandir(self.root / _TMP_DIR):
                with suppress(FileNotFoundError):  # finished meanwhile, or another sweeper
                    if now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.root / _TMP_DIR / uuid.uuid4().hex
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for d in reversed(missing):
            with suppress(FileExistsError):  # another writer created it first: same result
                d.mkdir()
            _fsync_dir(d.parent)


def _walk_keys(directory: Path, key_prefix: str, name_prefix: str = "") -> Iterator[str]:
    """Keys of the files under ``directory`` whose names there start with ``name_prefix``."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.startswith(name_prefix):
            continue  # dot-names are temporaries, never keys
        key = key_prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_keys(Path(entry.path), f"{key}/")
        else:
            yield key


def open_store(spec: str, s3_endpoint: str | None = None) -> ObjectStore:
    """The store a ``--store`` value names.

    A path or ``file://`` URL (FsStore), ``memory://`` (MemoryStore), or
    ``s3://bucket/prefix`` (S3Store; the prefix is optional, keys live under it).
    ``s3_endpoint`` is the URL of an S3-compatible service (MinIO, R2, Tigris,
    SeaweedFS); without it, AWS S3. It only applies to ``s3://`` stores.
    """
    if not spec:
        raise InvalidRequest(
            "empty store spec: give a directory, file:// URL, s3://bucket/prefix or memory://"
        )
    if spec.startswith("memory://"):
        return MemoryStore()
    if spec.startswith("s3://"):
        url = urlparse(spec)
        if not url.netloc or url.query or url.fragment or url.params:
            raise InvalidRequest(f"S3 store must look like s3://bucket/prefix, got {spec!r}")
        from graft_server.s3store import S3Store  # boto3 is only imported when S3 is used

        return S3Store(url.netloc, url.path.strip("/"), endpoint_url=s3_endpoint)
    if spec.startswith("file://"):
        url = urlparse(spec)
        if url.netloc not in ("", "localhost"):
            raise InvalidRequest(f"file:// store must be local, got host {url.netloc!r}")
        return FsStore(url2pathname(url.path))
    if _URL_SCHEME.match(spec):
        raise InvalidRequest(
            f"unknown store scheme in {spec!r}: use a directory, file://, s3:// or memory://"
        )
    return FsStore(spec)
