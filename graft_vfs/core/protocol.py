"""The wire protocol both sides speak: its constants and its one table of errors.

docs/protocol.md describes the routes. The server turns an exception into an error
body with ``wire_error``; the client turns an error body back into the exception with
``error_for_code``. Both read ``ERRORS``, so a code can never mean one thing to the
server and another to the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from graft_vfs.core.errors import (
    CommitConflict,
    CorruptData,
    Forbidden,
    GraftError,
    IdentityMismatch,
    InvalidRequest,
    InvalidVolumeId,
    RequestTimeout,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    TooLarge,
    Unauthorized,
    VolumeNotFound,
)
from graft_vfs.core.graft import MAX_PAGES_PER_READ
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.segment import MAX_SEGMENT_PAGES

MSGPACK = "application/x-msgpack"  # the content type of every request and answer body
SEGMENT_BODY = "application/octet-stream"  # POST /v1/segments: raw segment bytes

# A push sends at most this many pages in one request: larger pushes go as several
# uploaded segments and a small commit request, so no request body grows with a push.
MAX_INLINE_PAGES = MAX_SEGMENT_PAGES
# The smallest body limit a server may set: one push request of MAX_INLINE_PAGES pages
# that do not compress at all (8 MiB), its index and the request's other fields.
MIN_MAX_BODY = MAX_INLINE_PAGES * PAGE_SIZE + (1 << 20)
# Interior B-tree pages one read may ask the server to add below the pages it names.
MAX_EXPAND = 1024
# Pages one locate request (direct reads) may ask for: 128 MiB of database, an answer
# of about 15 bytes a page.
MAX_LOCATE_PAGES = 32768

__all__ = ["MAX_PAGES_PER_READ"]  # also part of the protocol (defined with grafts)


@dataclass(frozen=True)
class WireError:
    """One error of the protocol: its code, its HTTP status, the exception it stands for.

    ``client`` is False for an error that means something else on the client's side of
    the wire (the server's store failed: for the client, the server failed).
    """

    code: str
    status: int
    error: type[GraftError] | None
    client: bool = True


ERRORS: tuple[WireError, ...] = (
    WireError("invalid_request", 400, InvalidRequest),
    WireError("invalid_volume_id", 400, InvalidVolumeId),
    WireError("unauthorized", 401, Unauthorized),
    WireError("forbidden", 403, Forbidden),
    WireError("volume_not_found", 404, VolumeNotFound),
    WireError("snapshot_not_found", 404, SnapshotNotFound),
    WireError("request_timeout", 408, RequestTimeout),
    WireError("conflict", 409, CommitConflict),
    WireError("identity_mismatch", 409, IdentityMismatch),
    WireError("snapshot_expired", 410, SnapshotExpired),
    WireError("too_large", 413, TooLarge),
    WireError("corrupt_data", 500, CorruptData),
    WireError("storage_error", 503, StorageError, client=False),
)
INTERNAL_ERROR = WireError("internal_error", 500, None, client=False)  # a bug: anything else

_BY_CLASS = {e.error: e for e in ERRORS}
_BY_CODE = {e.code: e for e in ERRORS}


def wire_error(exc: BaseException) -> WireError:
    """The protocol's error for an exception, looked up along its MRO (a subclass maps
    like its parent unless listed itself)."""
    for cls in type(exc).__mro__:
        found = _BY_CLASS.get(cls)
        if found is not None:
            return found
    return INTERNAL_ERROR


def error_for_code(code: object) -> type[GraftError] | None:
    """The exception a client raises for an error code; None for codes it does not know
    or that mean a failure of the server (the caller raises RemoteError)."""
    found = _BY_CODE.get(code) if isinstance(code, str) else None
    return found.error if found is not None and found.client else None
