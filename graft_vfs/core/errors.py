"""The graft_vfs exception tree: every error the library raises on purpose.

Lower layers (the filesystem, HTTP, boto3) raise their own exceptions; they are
turned into these at exactly one boundary (the store, the remote client), and the
VFS maps these to SQLite result codes in one table (``vfs.SQLITE_CODES``).
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every graft_vfs error."""


class InvalidVolumeId(GraftError, ValueError):
    """A volume name is not ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""


class InvalidRequest(GraftError, ValueError):
    """An argument or a request body is malformed; nothing was changed."""


class UnsupportedDatabase(GraftError):
    """A database file cannot become a volume (page size, WAL mode, not SQLite)."""


class VolumeNotFound(GraftError):
    """The volume exists neither in the local cache nor on the server."""


class SnapshotNotFound(GraftError):
    """The requested LSN is beyond the volume's latest or no longer retained."""


class SnapshotExpired(SnapshotNotFound):
    """The LSN is older than the history the volume retains: pull a newer snapshot."""


class CommitConflict(GraftError):
    """A commit was based on a snapshot that is no longer the latest."""

    def __init__(self, message: str, latest_lsn: int | None = None) -> None:
        super().__init__(message)
        self.latest_lsn = latest_lsn


class Diverged(GraftError):
    """Local commits were not pushed and the server moved on: reset to recover."""


class Busy(GraftError):
    """Another writer holds the volume, or the snapshot is stale for writing."""


class CorruptData(GraftError):
    """Stored data failed its checksum or could not be decoded; never returned."""


class StorageError(GraftError):
    """The object store failed (I/O error, unreachable, permission)."""


class RemoteError(GraftError):
    """The server could not be reached or answered with an unexpected error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ReadOnly(GraftError):
    """A write was attempted on a read-only (past LSN) connection."""


class Unauthorized(GraftError):
    """The server requires a bearer token and got none, or one it does not know."""


class Forbidden(GraftError):
    """The token is valid but its scope excludes this volume or this kind of access."""


class IdentityMismatch(Diverged):
    """The server's volume (or store) is not the one the local cache's pages came from."""


class TooLarge(RemoteError):
    """A request body is larger than the server's limit (HTTP 413)."""

    def __init__(self, message: str, status: int | None = 413) -> None:
        super().__init__(message, status)


class RequestTimeout(RemoteError):
    """A request body did not arrive in full within the server's body timeout (HTTP 408)."""

    def __init__(self, message: str, status: int | None = 408) -> None:
        super().__init__(message, status)
