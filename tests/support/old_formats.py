"""Records and checkpoints as the formats before packed columns wrote them (LOG3 and
CKP3: a msgpack list per page, or per column), so tests can check that stores written
then still load, and load to the same page map."""

from __future__ import annotations

from graft_vfs.core.checkpoint import LIST_CHECKPOINT_KIND, Checkpoint
from graft_vfs.core.commit import ROW_RECORD_KIND, CommitRecord
from graft_vfs.core.envelope import pack
from graft_vfs.core.graft import encode_graft


def encode_log3(record: CommitRecord) -> bytes:
    """``record`` as LOG3 wrote it (CommitRecord.encode before LOG4)."""
    origin = {} if record.origin is None else {"origin": list(record.origin)}
    return pack(
        ROW_RECORD_KIND,
        {
            **origin,
            "vid": record.vid,
            "volume_id": record.volume_id,
            "lsn": record.lsn,
            "page_count": record.page_count,
            "hash": record.hash,
            "time": record.timestamp,
            "pages": encode_graft(record.pages()),
            "segments": [
                {"sid": s.sid, "index": [list(e) for e in s.entries]} for s in record.segments
            ],
        },
    )


def encode_ckp3(checkpoint: Checkpoint) -> bytes:
    """``checkpoint`` as CKP3 wrote it (Checkpoint.encode before CKP4)."""
    sids: dict[str, int] = {}
    cols: list[list[int]] = [[], [], [], [], [], []]
    for page in sorted(checkpoint.pages):
        loc = checkpoint.pages[page]
        e = loc.entry
        row = (page, loc.version, sids.setdefault(loc.sid, len(sids)), e.offset, e.length, e.crc)
        for col, value in zip(cols, row):
            col.append(value)
    fields = {
        "vid": checkpoint.vid,
        "volume_id": checkpoint.volume_id,
        "lsn": checkpoint.lsn,
        "page_count": checkpoint.page_count,
        "time": checkpoint.timestamp,
        "sids": list(sids),
        "cols": cols,
    }
    return pack(LIST_CHECKPOINT_KIND, fields, compress=True)
