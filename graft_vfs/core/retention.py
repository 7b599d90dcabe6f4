"""The small objects garbage collection writes: a volume's retention floor, GC's pending list.

Both travel in the checksummed envelope (``core.envelope``) like every other object
the server writes.
"""

from __future__ import annotations

from typing import NamedTuple

from graft_vfs.core.envelope import is_number, pack, unpack
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_segment_id

FLOOR_KIND = b"FLR1"
PENDING_KIND = b"GCP1"


MAX_DELETED = 1000  # deleted incarnations one name remembers


class Retained(NamedTuple):
    """A volume's retention object: its GC floor, and the incarnations of its name that
    were deleted (their volume ids), so a server that cached one learns it is gone."""

    floor: int
    deleted: tuple[bytes, ...] = ()


def encode_floor(floor: int, deleted: tuple[bytes, ...] = ()) -> bytes:
    """``volumes/{vid}/retention``: LSNs below ``floor`` are no longer retained."""
    fields: dict[str, int | list[bytes]] = {"floor": floor}
    if deleted:
        fields["deleted"] = list(deleted[-MAX_DELETED:])
    return pack(FLOOR_KIND, fields)


def decode_floor(data: bytes) -> int:
    return decode_retention(data).floor


def decode_retention(data: bytes) -> Retained:
    f = unpack(FLOOR_KIND, data, "retention floor")
    deleted: list[bytes] = []
    if "deleted" in f.d:
        raw = f.sequence("deleted")
        if len(raw) > MAX_DELETED or not all(
            isinstance(v, bytes) and len(v) == IDENTITY_SIZE for v in raw
        ):
            raise f.bad("deleted", f"is not a list of at most {MAX_DELETED} volume ids")
        deleted = [v for v in raw if isinstance(v, bytes)]
    return Retained(f.integer("floor", 0, MAX_LSN), tuple(deleted))


def encode_pending(pending: dict[str, float]) -> bytes:
    """``gc/pending``: when GC first saw each unreachable segment."""
    return pack(PENDING_KIND, {"segments": pending})


def decode_pending(data: bytes) -> dict[str, float]:
    f = unpack(PENDING_KIND, data, "the GC pending list")
    pending: dict[str, float] = {}
    for sid, seen in f.mapping("segments").items():
        try:
            name = validate_segment_id(sid)
        except ValueError as exc:
            raise f.bad("segments", str(exc)) from None
        if not is_number(seen) or not 0 <= seen < float("inf"):
            raise CorruptData(f"the GC pending list has a bad time for segment {sid}")
        pending[name] = seen
    return pending
