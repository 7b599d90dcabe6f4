"""The graft PRAGMAs: what ``PRAGMA graft_*`` answers on a connection to a volume (JSON)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import apsw

from graft_vfs.client.catchup import parse_wait, wait_for_lsn
from graft_vfs.client.volume import Volume
from graft_vfs.core.errors import InvalidRequest
from graft_vfs.core.version import VERSION

PRAGMA_PREFIX = "graft_"


class Connection(Protocol):
    """What a PRAGMA sees of the connection it runs on (``vfs.GraftFile``)."""

    @property
    def vol(self) -> Volume: ...

    @property
    def remote_lsn(self) -> int | None:
        """The past remote LSN an ``lsn=N`` connection reads, if the local log lacks it."""
        ...

    def current(self) -> tuple[int, int]:
        """The ``(local LSN, page count)`` the connection reads now."""
        ...


def _snapshot(c: Connection, value: str | None) -> dict[str, Any]:
    lsn, page_count = c.current()
    vol = c.vol
    out: dict[str, Any] = {"volume": vol.vid, "local_lsn": lsn, "page_count": page_count}
    if c.remote_lsn is not None:
        out.update(local_lsn=None, remote_lsn=c.remote_lsn)
    else:
        out["remote_lsn"] = vol.remote_lsn_at(lsn)
    return out


def _version(c: Connection, value: str | None) -> dict[str, Any]:
    return {
        "graft_vfs": VERSION,
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
    }


class _Prefetch:
    """The pin owner of a tree prefetch (the volume's latest snapshot, while it runs)."""


def prefetch(
    vol: Volume,
    names: list[str],
    progress: Callable[[int, int], None] | None = None,
    workers: int = 4,
) -> dict[str, Any]:
    """Fetch every page of the tables and indexes ``names`` at the latest snapshot.

    ``progress(done, known)``: pages walked so far, and pages known to be in the trees.
    """
    token = _Prefetch()
    lsn, page_count = vol.pin(token)
    try:
        return vol.reads.prefetch_trees(lsn, page_count, names, progress, workers)
    finally:
        vol.unpin(token)


def _prefetch(c: Connection, value: str | None) -> dict[str, Any]:
    if not value or not value.strip():
        raise InvalidRequest("PRAGMA graft_prefetch needs a table or index: graft_prefetch('NAME')")
    return prefetch(c.vol, [value])


SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _background_fetch(c: Connection, value: str | None) -> dict[str, Any]:
    reads = c.vol.reads
    if value is not None:
        word = value.strip().strip("'\"").lower()
        setting = SWITCH.get(word)
        if setting is None and word != "auto":
            raise InvalidRequest(
                f"PRAGMA graft_background_fetch={value}: give on, off (1/0, true/false) "
                "or auto (on while the round trip is >= 15 ms)"
            )
        reads.background = setting
    return {"background_fetch": reads.background_on(), "auto": reads.background is None}


def _sync(c: Connection, value: str | None) -> dict[str, Any]:
    return {"push": c.vol.sync.push(), "pull": c.vol.sync.pull()}


def _fork(c: Connection, value: str | None) -> dict[str, Any]:
    name = (value or "").strip().strip("'\"").strip()
    if not name:
        raise InvalidRequest("PRAGMA graft_fork needs the new volume's name: graft_fork('NAME')")
    return c.vol.sync.fork(name)


def _wait(c: Connection, value: str | None) -> dict[str, Any]:
    lsn, timeout = parse_wait(value)
    return wait_for_lsn(c.vol, lsn, timeout)


# Each PRAGMA's answer, from the connection and the PRAGMA's value (None without one).
PRAGMAS: dict[str, Callable[[Connection, str | None], dict[str, Any]]] = {
    "graft_status": lambda c, v: c.vol.status(),
    "graft_stats": lambda c, v: c.vol.counters(),
    "graft_pull": lambda c, v: c.vol.sync.pull(),
    "graft_push": lambda c, v: c.vol.sync.push(),
    "graft_sync": _sync,
    "graft_reset": lambda c, v: c.vol.sync.reset(),
    "graft_wait": _wait,
    "graft_fork": _fork,
    "graft_snapshot": _snapshot,
    "graft_version": _version,
    "graft_hydrate": lambda c, v: c.vol.hydrate(),
    "graft_prefetch": _prefetch,
    "graft_background_fetch": _background_fetch,
}
