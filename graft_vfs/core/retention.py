"""The small objects garbage collection writes: a volume's retention floor, GC's pending list.

Both travel in the checksummed envelope (``core.envelope``) like every other object
the server writes.
"""

from __future__ import annotations

from graft_vfs.core.envelope import is_number, pack, unpack
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.ids import MAX_LSN, validate_segment_id

FLOOR_KIND = b"FLR1"
PENDING_KIND = b"GCP1"


def encode_floor(floor: int) -> bytes:
    """``volumes/{vid}/retention``: LSNs below ``floor`` are no longer retained."""
    return pack(FLOOR_KIND, {"floor": floor})


def decode_floor(data: bytes) -> int:
    return unpack(FLOOR_KIND, data, "retention floor").integer("floor", 0, MAX_LSN)


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
