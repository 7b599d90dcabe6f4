"""Segments in the object store: verified uploads, index reads and coalesced frame reads.

The byte layout is ``graft_vfs.core.segment``'s; this module adds the I/O. Frames are
served still compressed (the client decompresses), but never without checking
their crc (bound to the page number): a corrupt or missing segment raises
CorruptData, never wrong data.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from graft_server.objstore import ObjectStore
from graft_vfs.core.errors import CorruptData, InvalidRequest, StorageError
from graft_vfs.core.ids import new_segment_id, validate_segment_id
from graft_vfs.core.segment import (
    HEADER_SIZE,
    Entry,
    decode_index,
    frame_crc,
    segment_head_size,
)
from graft_vfs.core.segment import coalesce_runs as core_coalesce_runs
from graft_vfs.core.segment import verify_segment as verify_segment_bytes

# Frames closer than this are fetched in one ranged read: one request costs far more
# than 16 KiB of extra transfer, on S3 as on a disk.
COALESCE_GAP = 16 * 1024
# Ranged reads of one answer run this many at a time: a cold lookup's interior levels
# are scattered over many segments, and read one after another they cost one store
# round trip each (about 5-15 ms on S3).
PARALLEL_READS = 8
_pool = ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix="graft-frames")


class MissingSegment(CorruptData):
    """A segment a page map points to is not in the store (GC, or damage)."""


class SegmentCache:
    """Recently read page frames, least recently used evicted first, bounded in bytes.

    Segments are immutable, so a cached frame never goes stale.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sid: str, entry: Entry) -> bytes | None:
        key = (sid, entry.offset)
        with self._lock:
            frame = self._frames.get(key)
            if frame is None:
                self.misses += 1
                return None
            self._frames.move_to_end(key)
            self.hits += 1
            return frame

    def put(self, sid: str, entry: Entry, frame: bytes) -> None:
        if len(frame) > self.max_bytes:
            return
        key = (sid, entry.offset)
        with self._lock:
            old = self._frames.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._frames[key] = frame
            self.bytes += len(frame)
            while self.bytes > self.max_bytes:
                _, evicted = self._frames.popitem(last=False)
                self.bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._frames)


SEGMENTS_PREFIX = "segments/"  # shared by every volume: a commit names its segments


def segment_key(sid: str) -> str:
    return f"{SEGMENTS_PREFIX}{validate_segment_id(sid)}"


def verify_segment(data: bytes) -> list[Entry]:
    """Check a client's segment (index checksum, each page's checksum and size); return its index.

    Pages are decompressed one at a time and dropped, so checking a segment holds one
    page, never all of them. Bad bytes from a client are a bad request (400), not
    corrupt storage (500).
    """
    try:
        return verify_segment_bytes(data)
    except CorruptData as exc:
        raise InvalidRequest(f"segment rejected: {exc}") from exc


def put_segment(store: ObjectStore, data: bytes) -> str:
    """Store verified segment bytes under a new segment id and return the id."""
    sid = new_segment_id()
    # Segments are immutable: a create-only write makes that hold even if two ids
    # ever collided (80 random bits make it a theoretical case; the client retries).
    if not store.put_if_absent(segment_key(sid), data):
        raise StorageError(f"segment id {sid} already exists")
    return sid


def upload_segment(store: ObjectStore, data: bytes) -> str:
    """``POST /v1/segments``: verify a segment, store it, return its new id."""
    verify_segment(data)
    return put_segment(store, data)


def read_segment_index(store: ObjectStore, sid: str) -> list[Entry] | None:
    """A stored segment's index (two ranged reads: header, then the rest of the head).

    None if no such segment exists; CorruptData if its head fails the checksum.
    """
    key = segment_key(sid)
    header = store.get_range(key, 0, HEADER_SIZE)
    if header is None:
        return None
    rest = store.get_range(key, HEADER_SIZE, segment_head_size(header) - HEADER_SIZE)
    if rest is None:
        raise CorruptData(f"segment {sid} disappeared while its index was read")
    return decode_index(header + rest)


def coalesce_runs(entries: Iterable[Entry], gap: int = COALESCE_GAP) -> list[list[Entry]]:
    """Group entries (by offset) into runs whose neighbours are at most ``gap`` bytes apart."""
    return core_coalesce_runs(entries, gap)


def fetch_frames(
    store: ObjectStore, sid: str, entries: Iterable[Entry], cache: SegmentCache | None = None
) -> dict[int, bytes]:
    """Each entry's compressed frame, crc-checked, by page; one ranged read per run."""
    return fetch_segments_frames(store, {sid: list(entries)}, cache)


def fetch_segments_frames(
    store: ObjectStore,
    wanted: Mapping[str, Iterable[Entry]],
    cache: SegmentCache | None = None,
) -> dict[int, bytes]:
    """Each entry's frame of several segments (``sid -> entries``), crc-checked, by page.

    Frames in the cache are not read again; the others are read one ranged read per
    run, up to PARALLEL_READS runs at a time.
    """
    frames: dict[int, bytes] = {}
    runs: list[tuple[str, list[Entry]]] = []
    for sid, entries in wanted.items():
        missing = []
        for e in entries:
            frame = cache.get(sid, e) if cache is not None else None
            if frame is None:
                missing.append(e)
            else:
                frames[e.page] = frame
        runs += [(sid, run) for run in coalesce_runs(missing)]
    if len(runs) == 1:
        answers = [_read_run_retried(store, *runs[0])]
    else:
        answers = list(_pool.map(lambda r: _read_run_retried(store, *r), runs))
    for (sid, run), got in zip(runs, answers):
        for e in run:
            frames[e.page] = got[e.page]
            if cache is not None:
                cache.put(sid, e, got[e.page])
    return frames


def _read_run_retried(store: ObjectStore, sid: str, run: list[Entry]) -> dict[int, bytes]:
    key = segment_key(sid)
    try:
        return _read_run(store, key, sid, run)
    except MissingSegment:
        raise
    except CorruptData:
        # A read can come back short or damaged in transit (a dropped connection,
        # a flaky disk): read once more before calling the object corrupt.
        return _read_run(store, key, sid, run)


def _read_run(store: ObjectStore, key: str, sid: str, run: list[Entry]) -> dict[int, bytes]:
    start = run[0].offset
    length = max(e.offset + e.length for e in run) - start
    data = store.get_range(key, start, length)
    if data is None:
        raise MissingSegment(f"segment {sid} is missing")
    if len(data) != length:
        raise CorruptData(f"segment {sid} is truncated")
    frames = {}
    for e in run:
        frame = data[e.offset - start : e.offset - start + e.length]
        if frame_crc(e.page, frame) != e.crc:
            raise CorruptData(f"checksum mismatch for page {e.page} in segment {sid}")
        frames[e.page] = frame
    return frames
