"""Identifiers: volume names, segment ids, and the fixed page size."""

from __future__ import annotations

import os
import re
import time

from graft_vfs.core.errors import InvalidRequest, InvalidVolumeId

PAGE_SIZE = 4096

_VOLUME_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_volume_id(vid: object) -> str:
    """Return ``vid`` if it is a valid volume name, else raise InvalidVolumeId.

    Names become object-store keys, so anything that could escape a prefix
    (slashes, ``..``, empty, control characters) is refused here, before any I/O.
    """
    if not isinstance(vid, str) or not _VOLUME_ID.fullmatch(vid) or ".." in vid:
        raise InvalidVolumeId(
            f"invalid volume name {vid!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'"
        )
    return vid


def new_segment_id() -> str:
    """A unique, time-ordered segment id (48-bit milliseconds + 80 random bits, hex)."""
    millis = int(time.time() * 1000) & ((1 << 48) - 1)
    return f"{millis:012x}{os.urandom(10).hex()}"


_SEGMENT_ID = re.compile(r"[0-9a-f]{32}")


def validate_segment_id(sid: object) -> str:
    if not isinstance(sid, str) or not _SEGMENT_ID.fullmatch(sid):
        shown = repr(sid)[:40] if isinstance(sid, str) else f"a {type(sid).__name__}"
        raise InvalidRequest(f"invalid segment id {shown}: expected 32 lowercase hex digits")
    return sid


MAX_LSN = (1 << 63) - 1  # LSNs travel as msgpack ints and print in 20 digits
IDENTITY_SIZE = 16  # random bytes naming a volume's or a store's incarnation


def new_identity() -> bytes:
    return os.urandom(IDENTITY_SIZE)
