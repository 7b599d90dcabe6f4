"""Deleting a volume: the name disappears at once, its segments when GC finds them unused.

``delete`` first records the volume's identity as deleted in its retention object (a
server that cached the volume reads it at its next probe that finds no newer record, or
within FLOOR_RECHECK seconds of reads, and answers ``volume_not_found`` from then on),
then deletes the checkpoints and the log records, oldest first. A crash part way
leaves a log with a gap, which a server refuses as corrupt data rather than serve part
of a history; ``graft delete`` run again finishes. The segments stay until GC finds
that no volume (a fork among them) names them. The name can be used again: a new
volume, with a new identity, that clients of the old one refuse (identity mismatch).
"""

from __future__ import annotations

from typing import NamedTuple

from graft_server.index import Index, read_retention
from graft_server.keys import checkpoint_prefix, log_prefix, retention_key
from graft_vfs.core.errors import CorruptData, VolumeNotFound
from graft_vfs.core.ids import validate_volume_id
from graft_vfs.core.retention import encode_floor


class Deleted(NamedTuple):
    vid: str
    lsn: int  # the latest LSN the volume had
    records: int  # log records deleted
    checkpoints: int  # checkpoints deleted


def delete(index: Index, vid: str) -> Deleted:
    vid = validate_volume_id(vid)
    store = index.store
    vol = index.volume(vid)
    with vol.lock:
        try:
            latest = index.latest(vol)
        except (VolumeNotFound, CorruptData):
            # Nothing left, or a deletion cut short (a gap): finish it if there is one.
            latest = 0
        volume_id = vol.volume_id
        retained = read_retention(store, vid)
        if volume_id is not None and volume_id not in retained.deleted:
            # The floor starts again at 0 for a volume created again under the name.
            store.put(retention_key(vid), encode_floor(0, (*retained.deleted, volume_id)))
        checkpoints = store.list(checkpoint_prefix(vid))
        records = store.list(log_prefix(vid))
        if not latest and not checkpoints and not records:
            raise VolumeNotFound(f"volume {vid!r} does not exist")
        for key in [*checkpoints, *records]:  # oldest first: a cut leaves a gap
            store.delete(key)
        vol.loaded = False
    index.unload(vol)
    return Deleted(vid, latest, len(records), len(checkpoints))
