"""The commit protocol: verify a commit, create its log record, tell landed from conflict.

A commit on top of LSN ``base`` becomes LSN ``base + 1`` by creating that log record
with a create-only write: whoever creates it wins, in this process as across the
processes sharing one store. Before that, the server checks what only it can: that
the commit's hash is the hash of the pages it carries, that its segments exist and do
not overlap, and that a commit growing the volume writes every new page. A retry of a
commit that already landed is recognised by its hash at ``base + 1``.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Sequence

from pyroaring import BitMap

from graft_server.index import Index, VolumeLog, put_checkpoint, read_record
from graft_server.keys import log_key
from graft_server.segments import put_segment, read_segment_index, segment_key, verify_segment
from graft_vfs.core.commit import CommitHasher, CommitRecord, SegmentRef
from graft_vfs.core.errors import CommitConflict, GraftError, InvalidRequest, VolumeNotFound
from graft_vfs.core.faults import crash_point
from graft_vfs.core.identity import Identity
from graft_vfs.core.ids import new_identity, validate_volume_id
from graft_vfs.core.segment import Entry, decode_page

# A commit writes a checkpoint when the log since the last one it knows of is this many
# records long, so a cold process reads one checkpoint and fewer records than this,
# index.LOAD_PARALLEL at a time: 31 records are 4 store round trips. (A checkpoint
# written after the GC floor pins the segments it names until a later pass drops it,
# so checkpoints much more often would cost storage between GC passes.)
CHECKPOINT_EVERY = 32
# Segments of one commit whose bytes the hash check holds at once (see _verify_hash).
MAX_OPEN_SEGMENTS = 2

log = logging.getLogger("graft.server")


class Commits:
    """Commits to the volumes of one index. Thread-safe.

    When the log since the newest checkpoint it knows of is ``checkpoint_every`` records
    long, the process that created a record also writes the checkpoint of its LSN (a
    failed write is tried again at the next commit), so loading a volume never reads a
    long log.
    """

    def __init__(self, index: Index, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        self.index = index
        self.store = index.store
        self.checkpoint_every = checkpoint_every

    def commit(
        self,
        vid: str,
        base: int,
        page_count: int,
        hash: bytes,
        segment: bytes | None = None,
        sids: Sequence[str] = (),
        expected: Identity | None = None,
        nonce: bytes = b"",
    ) -> int:
        """Commit pages on top of LSN ``base``; return the new LSN, ``base + 1``.

        ``segment`` carries pages inline; ``sids`` names segments uploaded before.
        A retry of a commit that already landed (same ``hash`` at ``base + 1``)
        returns ``base + 1`` again. Raises CommitConflict (with ``latest_lsn``) if
        ``base`` is not the latest, InvalidRequest for a malformed commit or a
        ``hash`` that is not the hash of its pages, IdentityMismatch if the volume is
        not ``expected``.
        """
        vid = validate_volume_id(vid)  # before any I/O: the name becomes keys
        inline = verify_segment(segment) if segment is not None else []
        uploaded = self._uploaded_segments(sids)
        changed = BitMap()
        for entries in [inline, *(ref.entries for ref in uploaded)]:
            seg_pages = BitMap(e.page for e in entries)
            if changed.intersection_cardinality(seg_pages):
                raise InvalidRequest(f"page {(changed & seg_pages).min()} is in two segments")
            changed |= seg_pages
        if changed and changed.max() >= page_count:
            raise InvalidRequest(f"page {changed.max()} is beyond the page count {page_count}")
        # Before the retry check: a body claiming a landed commit's hash with other
        # pages must not be answered as that commit.
        self._verify_hash(vid, base, page_count, hash, nonce, segment, inline, uploaded)

        vol = self.index.volume(vid)
        with vol.lock:
            # The floor as cached: a commit on a cache GC left behind is caught below.
            self.index.refresh(vol, fresh_floor=False)
            self.index.check_identity(vol, expected)
            volume_id = vol.volume_id if base else new_identity()
            if base != vol.latest:
                return self._landed_or_conflict(vol, base, hash)
            previous = vol.page_count_at(base)
            # Commit times never go backwards (History.lsn_at searches them), whatever
            # the clocks of the servers that made them.
            not_before = vol.timestamp_at(base) if base else 0.0
            if page_count > previous and not changed.contains_range(previous, page_count):
                raise InvalidRequest(
                    f"commit grows the volume from {previous} to {page_count} pages "
                    "but does not write every new page"
                )

        # The protocol's steps 2 and 3, without the lock: the create-only write
        # below decides the race, in this process as across processes.
        refs = list(uploaded)
        if segment is not None and inline:  # a truncation-only commit stores no segment
            refs.insert(0, SegmentRef(put_segment(self.store, segment), inline))
        crash_point("server.commit.after_segment")
        assert volume_id is not None  # base > 0 == latest, so the cache holds commits
        when = max(time.time(), not_before)
        record = CommitRecord(vid, volume_id, base + 1, page_count, hash, when, refs)
        won = self.store.put_if_absent(log_key(vid, base + 1), record.encode())
        crash_point("server.commit.after_log")

        checkpoint = None
        with vol.lock:
            # If this cache was behind and GC had deleted the record at base + 1 (below
            # its floor), the create-only write could not see it: the record written
            # is a stray below the floor, which no reader sees and GC deletes, and the
            # commit did not land.
            stray = won and self.index.passed_by_gc(vol, fresh=True) and vol.floor > base + 1
            if won and not stray and vol.latest == base:
                vol.apply(record)
                if base + 1 - vol.checkpointed >= self.checkpoint_every:
                    checkpoint = vol.checkpoint(base + 1)
        if stray:
            self.index.unload(vol)
            with vol.lock:
                self.index.refresh(vol)
                raise CommitConflict(
                    f"commit is based on LSN {base} but the latest LSN of {vid!r} is "
                    f"{vol.latest}",
                    latest_lsn=vol.latest,
                )
        if won:
            if checkpoint is not None:
                try:
                    put_checkpoint(self.store, checkpoint)
                except GraftError as exc:  # the commit landed; the next one checkpoints
                    log.warning("checkpoint of %s at %d failed: %s", vid, base + 1, exc)
                else:
                    with vol.lock:
                        vol.checkpointed = max(vol.checkpointed, base + 1)
            return base + 1
        with vol.lock:
            # Lost the race (or someone already cached ours): the record at
            # base+1 decides between "your retry landed" and "conflict". An
            # inline segment written above is now an orphan, left for GC.
            self.index.refresh(vol)
            return self._landed_or_conflict(vol, base, hash)

    def _verify_hash(
        self,
        vid: str,
        base: int,
        page_count: int,
        digest: bytes,
        nonce: bytes,
        segment: bytes | None,
        inline: list[Entry],
        uploaded: list[SegmentRef],
    ) -> None:
        """Refuse a commit whose ``digest`` is not ``commit_hash`` of the pages it carries.

        Pages are decoded and hashed one at a time in page order, merged across the
        segments; a segment's bytes are held from its first page to its last, and at
        most MAX_OPEN_SEGMENTS at once: a client may send one segment of a B-tree's
        upper levels (``core.segment.upper_first``) whose pages fall between those of
        the others, but not interleave them all.
        """
        parts: list[tuple[list[Entry], str | None]] = [(ref.entries, ref.sid) for ref in uploaded]
        if inline:
            parts.append((inline, None))
        hasher = CommitHasher(vid, base, page_count, nonce)
        order = [(entries[0].page, i) for i, (entries, _) in enumerate(parts) if entries]
        heapq.heapify(order)
        at = [0] * len(parts)
        held: dict[int, bytes] = {}
        while order:
            _, i = heapq.heappop(order)
            entries, sid = parts[i]
            if i not in held:
                if len(held) >= MAX_OPEN_SEGMENTS:
                    raise InvalidRequest(
                        "the segments of a commit interleave their pages: send ascending, "
                        "non-interleaved page ranges, and at most one segment between them"
                    )
                held[i] = self._segment_bytes(segment, sid)
            e = entries[at[i]]
            data = held[i]
            try:
                hasher.add(e.page, decode_page(e, data[e.offset : e.offset + e.length]))
            except ValueError:
                raise InvalidRequest(
                    f"page {e.page} is in a commit twice, or a segment is not sorted by page"
                ) from None
            at[i] += 1
            if at[i] < len(entries):
                heapq.heappush(order, (entries[at[i]].page, i))
            else:
                del held[i]
        if hasher.digest() != digest:
            raise InvalidRequest(
                f"hash {digest.hex()[:16]}... is not the hash of the commit's pages "
                f"({hasher.digest().hex()[:16]}...): compute it with "
                "graft_vfs.core.commit.commit_hash over the pages sent"
            )

    def _segment_bytes(self, inline: bytes | None, sid: str | None) -> bytes:
        """The bytes of a commit's inline segment (``sid`` None) or of an uploaded one."""
        if sid is None:
            assert inline is not None
            return inline
        stored = self.store.get(segment_key(sid))
        if stored is None:
            raise InvalidRequest(f"segment {sid} was never uploaded")
        return stored

    def _uploaded_segments(self, sids: Sequence[str]) -> list[SegmentRef]:
        """The uploaded segments a commit names, with their indexes read from the store."""
        refs = []
        for sid in sids:
            entries = read_segment_index(self.store, sid)
            if entries is None:
                raise InvalidRequest(f"segment {sid} was never uploaded")
            refs.append(SegmentRef(sid, entries))
        return refs

    def _landed_or_conflict(self, vol: VolumeLog, base: int, digest: bytes) -> int:
        """For a commit on a stale ``base``: its earlier attempt landed, or a conflict."""
        if base < vol.latest:
            if base >= vol.base:
                landed = vol.commit_at(base + 1).hash
            else:
                record = read_record(self.store, vol.vid, base + 1)
                landed = record.hash if record is not None else b""
            if landed == digest:
                return base + 1
        if not vol.latest:
            raise VolumeNotFound(f"volume {vol.vid!r} has no commits, so no LSN {base}")
        raise CommitConflict(
            f"commit is based on LSN {base} but the latest LSN of {vol.vid!r} is {vol.latest}",
            latest_lsn=vol.latest,
        )
