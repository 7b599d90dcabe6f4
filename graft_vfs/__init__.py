"""graft_vfs: lazy, partial, strongly consistent replication of SQLite through object storage.

import apsw, graft_vfs
graft_vfs.register(remote="http://127.0.0.1:3000", cache_dir="/tmp/cache")
con = apsw.Connection("file:orders?vfs=graft", flags=apsw.SQLITE_OPEN_URI
                      | apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graft_vfs.core.errors import (
    Busy,
    CommitConflict,
    CorruptData,
    Diverged,
    Forbidden,
    GraftError,
    IdentityMismatch,
    InvalidRequest,
    InvalidVolumeId,
    ReadOnly,
    RemoteError,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    Unauthorized,
    UnsupportedDatabase,
    VolumeNotFound,
)
from graft_vfs.core.version import VERSION

if TYPE_CHECKING:
    from graft_vfs.client.api import (
        DEFAULT_CACHE_DIR as DEFAULT_CACHE_DIR,
    )
    from graft_vfs.client.api import (
        DEFAULT_VFS as DEFAULT_VFS,
    )
    from graft_vfs.client.api import (
        connect,
        register,
        unregister,
    )
    from graft_vfs.client.api import (
        runtime_of as runtime_of,
    )
    from graft_vfs.client.catchup import LsnNotReached
    from graft_vfs.client.runtime import Options, Runtime
    from graft_vfs.client.transaction import (
        Transaction,
        TransactionConflict,
        landed_lsn,
        transaction,
        transactional,
    )
    from graft_vfs.client.volume_api import Volume

__version__ = VERSION

__all__ = [
    "register",
    "unregister",
    "connect",
    "transaction",
    "transactional",
    "landed_lsn",
    "Transaction",
    "Volume",
    "Options",
    "Runtime",
    "GraftError",
    "InvalidVolumeId",
    "InvalidRequest",
    "UnsupportedDatabase",
    "VolumeNotFound",
    "SnapshotNotFound",
    "SnapshotExpired",
    "CommitConflict",
    "Diverged",
    "IdentityMismatch",
    "Busy",
    "CorruptData",
    "StorageError",
    "RemoteError",
    "Unauthorized",
    "Forbidden",
    "ReadOnly",
    "TransactionConflict",
    "LsnNotReached",
    "__version__",
]

# The client (apsw, the HTTP client, the local store) loads at first use, so the server
# and other users of graft_vfs.core import the core alone.
_CLIENT = {
    "register": "graft_vfs.client.api",
    "unregister": "graft_vfs.client.api",
    "connect": "graft_vfs.client.api",
    "runtime_of": "graft_vfs.client.api",
    "DEFAULT_VFS": "graft_vfs.client.api",
    "DEFAULT_CACHE_DIR": "graft_vfs.client.api",
    "Options": "graft_vfs.client.runtime",
    "Runtime": "graft_vfs.client.runtime",
    "transaction": "graft_vfs.client.transaction",
    "transactional": "graft_vfs.client.transaction",
    "landed_lsn": "graft_vfs.client.transaction",
    "Transaction": "graft_vfs.client.transaction",
    "TransactionConflict": "graft_vfs.client.transaction",
    "LsnNotReached": "graft_vfs.client.catchup",
    "Volume": "graft_vfs.client.volume_api",
}


def __getattr__(name: str) -> Any:
    module = _CLIENT.get(name)
    if module is None:
        raise AttributeError(f"module 'graft_vfs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
