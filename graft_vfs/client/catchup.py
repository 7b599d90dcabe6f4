"""Read your writes: pull until a volume has at least a given remote LSN.

A writer's push answers the remote LSN its commit landed at (``PRAGMA graft_push``,
``graft_vfs.transaction``); handed to a reader on another cache, that LSN is a token:
``PRAGMA graft_wait(N)``, the URI parameter ``min_lsn=N`` or ``connect(..., min_lsn=N)``
pull until the reader's cache has remote LSN N or later, so its next transaction reads
the write. Past the timeout it is ``LsnNotReached``, also when N is beyond the server's
latest LSN (a token from another volume or another server).
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

from graft_vfs.client.local import VolumeRow
from graft_vfs.core.errors import GraftError, InvalidRequest

DEFAULT_WAIT_TIMEOUT = 30.0  # seconds
MAX_WAIT_TIMEOUT = 24 * 3600.0
MAX_LSN = (1 << 63) - 1
FIRST_PAUSE = 0.01  # seconds between pulls that did not reach the LSN, doubling
MAX_PAUSE = 0.5


class LsnNotReached(GraftError):
    """A replica did not reach the remote LSN it waited for within the timeout."""


class _Pulls(Protocol):
    def pull(self) -> dict[str, Any]: ...


class Waiting(Protocol):
    """What a wait needs of a volume (``volume.Volume``)."""

    vid: str

    @property
    def sync(self) -> _Pulls: ...

    def refresh(self) -> VolumeRow: ...


def parse_lsn(value: str, what: str) -> int:
    """A non-negative LSN given as text (a PRAGMA value, a URI parameter)."""
    text = value.strip().strip("'\"").strip()
    if not text.isdigit() or len(text) > 19 or int(text) > MAX_LSN:
        raise InvalidRequest(f"{what}={value!r}: give a remote LSN, a non-negative integer")
    return int(text)


def parse_timeout(value: str, what: str) -> float:
    """A timeout in seconds given as text, 0 to one day."""
    text = value.strip().strip("'\"").strip()
    try:
        seconds = float(text) if len(text) <= 32 else math.nan
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_WAIT_TIMEOUT:  # NaN fails too
        raise InvalidRequest(
            f"{what}={value!r}: give a timeout in seconds, 0 to {MAX_WAIT_TIMEOUT:g}"
        )
    return seconds


def parse_wait(value: str | None) -> tuple[int, float]:
    """``PRAGMA graft_wait``'s value: ``N`` or ``'N,TIMEOUT'`` (SQLite takes one value)."""
    if value is None or not value.strip():
        raise InvalidRequest(
            "PRAGMA graft_wait needs a remote LSN: graft_wait(N), or graft_wait('N,TIMEOUT')"
        )
    text = value.strip().strip("'\"").strip()
    lsn, _, timeout = text.partition(",")
    seconds = parse_timeout(timeout, "graft_wait timeout") if timeout else DEFAULT_WAIT_TIMEOUT
    return parse_lsn(lsn, "graft_wait"), seconds


def wait_for_lsn(vol: Waiting, lsn: int, timeout: float = DEFAULT_WAIT_TIMEOUT) -> dict[str, Any]:
    """Pull ``vol`` until its cache has remote LSN ``lsn`` or later; ``LsnNotReached`` after
    ``timeout`` seconds. A diverged volume (local commits not pushed while the server moved
    on) raises ``Diverged`` from its pull, as ``PRAGMA graft_pull`` does.

    Answers ``remote_lsn``, ``local_lsn`` (what the cache has now), ``pulls`` and ``seconds``.
    """
    start = time.monotonic()
    deadline = start + timeout
    pulls, pause = 0, FIRST_PAUSE
    row = vol.refresh()
    while row.remote_lsn < lsn:
        now = time.monotonic()
        if pulls and now >= deadline:
            raise LsnNotReached(
                f"volume {vol.vid!r} did not reach remote LSN {lsn} within {timeout:g} s: "
                f"the server is at LSN {row.remote_lsn} (pulled {pulls} time(s)); an LSN "
                "beyond the server's latest comes from another volume or server, or the "
                "writer's push has not landed: wait longer or check the LSN"
            )
        vol.sync.pull()
        pulls += 1
        row = vol.refresh()
        if row.remote_lsn < lsn:
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, MAX_PAUSE)
    return {
        "remote_lsn": row.remote_lsn,
        "local_lsn": row.local_lsn,
        "pulls": pulls,
        "seconds": round(time.monotonic() - start, 3),
    }
