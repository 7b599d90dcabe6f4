"""Where a volume's objects live in the object store: its log, checkpoints and GC floor.

Every key of a volume sits under ``volumes/{vid}/``; names are checked by
``validate_volume_id`` before any key is built, so none can escape that prefix. LSNs
print in 20 digits, the width of any u64, so the store's lexicographic listing is LSN
order. The store's own identity is the object ``STORE_KEY``, outside every volume.
"""

from __future__ import annotations

# The store identity object: its codec is the core's, its place is part of this layout.
from graft_vfs.core.identity import STORE_KEY as STORE_KEY

VOLUMES_PREFIX = "volumes/"


def log_prefix(vid: str) -> str:
    return f"{VOLUMES_PREFIX}{vid}/log/"


def log_key(vid: str, lsn: int) -> str:
    """The commit record of LSN ``lsn``: created once, by whoever wins that LSN."""
    return f"{log_prefix(vid)}{lsn:020d}"


def checkpoint_prefix(vid: str) -> str:
    return f"{VOLUMES_PREFIX}{vid}/checkpoints/"


def checkpoint_key(vid: str, lsn: int) -> str:
    """The page map as of LSN ``lsn``."""
    return f"{checkpoint_prefix(vid)}{lsn:020d}"


def retention_key(vid: str) -> str:
    """The GC floor (``core.retention``): LSNs below it are no longer retained."""
    return f"{VOLUMES_PREFIX}{vid}/retention"


def lsn_of(key: str) -> int:
    """The LSN a log or checkpoint key names."""
    return int(key.rsplit("/", 1)[1])


def vid_of(key: str) -> str:
    """The volume a key under ``VOLUMES_PREFIX`` belongs to."""
    return key[len(VOLUMES_PREFIX) :].split("/", 1)[0]


def is_log_key(key: str) -> bool:
    """Whether ``key`` is a log record: a volume exists exactly while it has one."""
    return "/log/" in key
