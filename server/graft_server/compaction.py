"""Compaction: checkpoints written for GC, with the pages of small segments merged.

Every commit leaves its own segment, so a long history ends up spread over many small
ones. Before GC drops old log records, the versions those records point to that sit
in small segments are copied, still compressed, into merged segments named by the new
checkpoint; the small segments then become unreachable and GC deletes them.
"""

from __future__ import annotations

from collections import defaultdict

from graft_server.index import Index, put_checkpoint
from graft_server.segments import fetch_frames, put_segment
from graft_vfs.core.checkpoint import Checkpoint, Located
from graft_vfs.core.segment import (
    MAX_SEGMENT_PAGES,
    decompress_page,
    encode_frames,
    upper_first,
    upper_pages,
)

SMALL_SEGMENT_PAGES = 256  # compaction merges segments holding fewer live pages
MERGED_SEGMENT_PAGES = MAX_SEGMENT_PAGES  # compaction writes no segment a client could not


def write_checkpoint(index: Index, vid: str, lsn: int | None = None) -> Checkpoint:
    """Write the checkpoint of ``lsn`` (default: the latest) and return it."""
    checkpoint = index.checkpoint(vid, lsn)
    put_checkpoint(index.store, checkpoint)
    return checkpoint


def compact(
    index: Index,
    vid: str,
    lsn: int,
    relocated: dict[tuple[int, int], Located],
    merge_upto: int,
    small_pages: int = SMALL_SEGMENT_PAGES,
) -> Checkpoint:
    """Write the checkpoint of ``lsn`` with page versions of small segments merged.

    Versions written at or before ``merge_upto`` (whose log records GC is about to
    drop) that live in segments holding fewer than ``small_pages`` of the
    checkpoint's pages are copied, still compressed, into new segments, so the
    old small segments become unreachable. Later versions stay where their
    retained records point. ``relocated`` maps ``(page, version)`` to a copy made
    earlier in the same GC run (never copy a version twice); updated in place.
    """
    store = index.store
    checkpoint = index.checkpoint(vid, lsn)
    by_sid: dict[str, list[Located]] = defaultdict(list)
    for page, loc in checkpoint.pages.items():
        copy = relocated.get((page, loc.version))
        if copy is not None:
            checkpoint.pages[page] = copy
        elif loc.version <= merge_upto:
            by_sid[loc.sid].append(loc)
    small = [sid for sid, locs in by_sid.items() if len(locs) < small_pages]
    if len(small) > 1:
        frames: list[tuple[int, int, bytes]] = []  # (page, version, frame)
        for sid in small:
            got = fetch_frames(store, sid, [loc.entry for loc in by_sid[sid]])
            frames += [(loc.entry.page, loc.version, got[loc.entry.page]) for loc in by_sid[sid]]
        by_page = {page: (version, frame) for page, version, frame in frames}
        upper = upper_pages((p, decompress_page(f, p)) for p, (_, f) in by_page.items())
        for pages in upper_first(by_page, upper, MERGED_SEGMENT_PAGES):
            chunk = [(page, *by_page[page]) for page in pages]
            data, entries = encode_frames((page, frame) for page, _, frame in chunk)
            sid = put_segment(store, data)
            for (page, version, _), entry in zip(chunk, entries):
                loc = Located(version, sid, entry)
                checkpoint.pages[page] = relocated[(page, version)] = loc
    put_checkpoint(store, checkpoint)
    return checkpoint
