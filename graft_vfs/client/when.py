"""Points in time as users write them: ISO 8601, or a time ago (``90s``, ``5m``, ``2h``, ``7d``)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RELATIVE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)([smhdw])")


def parse_time(text: str, now: float | None = None) -> float:
    """Seconds since the epoch for ``text``; ValueError with the accepted forms otherwise.

    A relative time (``5m``) means that long before ``now``; an ISO 8601 time without
    a zone is UTC.
    """
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        ago = float(relative.group(1)) * _UNITS[relative.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(
            f"cannot read the time {text[:40]!r}: give ISO 8601 (2026-11-30T12:00:00Z) "
            "or a time ago such as 90s, 5m, 2h, 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
