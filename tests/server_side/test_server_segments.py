"""Segment I/O: verified uploads, index reads and coalesced, checksummed frame reads."""

from __future__ import annotations

import os

import pytest
import zstandard

from graft_server.objstore import MemoryStore
from graft_server.segments import (
    coalesce_runs,
    fetch_frames,
    read_segment_index,
    segment_key,
    upload_segment,
)
from graft_vfs.core.errors import CorruptData, InvalidRequest
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.segment import Entry, encode_segment


def random_pages(n: int) -> list[tuple[int, bytes]]:
    # Incompressible pages, so frames are ~4 KiB each and gaps are predictable.
    return [(p, os.urandom(PAGE_SIZE)) for p in range(n)]


def test_coalesce_runs_joins_close_entries_only() -> None:
    entries = [Entry(2, 10_000, 100, 0), Entry(0, 0, 100, 0), Entry(1, 100, 100, 0)]
    assert [[e.page for e in run] for run in coalesce_runs(entries, gap=16)] == [[0, 1], [2]]
    assert [[e.page for e in run] for run in coalesce_runs(entries, gap=20_000)] == [[0, 1, 2]]
    assert coalesce_runs([]) == []


def test_upload_then_read_index_with_two_ranged_reads() -> None:
    store = MemoryStore()
    data, entries = encode_segment(random_pages(3))
    sid = upload_segment(store, data)
    assert store.get(segment_key(sid)) == data
    before = store.stats["range_gets"]
    assert read_segment_index(store, sid) == entries
    assert store.stats["range_gets"] - before == 2
    assert read_segment_index(store, "0" * 32) is None


@pytest.mark.parametrize("corrupt", [b"garbage", b"", "flip"])
def test_upload_refuses_bad_segments_and_stores_nothing(corrupt: bytes | str) -> None:
    store = MemoryStore()
    data, _ = encode_segment(random_pages(2))
    bad = data[:-1] + bytes([data[-1] ^ 1]) if corrupt == "flip" else corrupt
    assert isinstance(bad, bytes)
    with pytest.raises(InvalidRequest):
        upload_segment(store, bad)
    assert store.list("") == []


def test_fetch_frames_coalesces_adjacent_pages() -> None:
    store = MemoryStore()
    pages = random_pages(12)
    data, entries = encode_segment(pages)
    sid = upload_segment(store, data)
    wanted = [entries[0], entries[1], entries[2], entries[11]]
    frames = fetch_frames(store, sid, wanted)
    # Pages 0-2 are adjacent; page 11 is ~32 KiB further: two reads in all.
    assert store.stats["range_gets"] == 2
    dctx = zstandard.ZstdDecompressor()
    assert {p: dctx.decompress(f) for p, f in frames.items()} == {
        p: pages[p][1] for p in (0, 1, 2, 11)
    }


def test_fetch_frames_never_returns_corrupt_or_missing_data() -> None:
    store = MemoryStore()
    data, entries = encode_segment(random_pages(2))
    sid = upload_segment(store, data)
    key = segment_key(sid)
    e = entries[1]
    store.put(key, data[: e.offset] + bytes([data[e.offset] ^ 0xFF]) + data[e.offset + 1 :])
    assert fetch_frames(store, sid, [entries[0]])  # the other page is still fine
    with pytest.raises(CorruptData, match="checksum"):
        fetch_frames(store, sid, [e])
    store.put(key, data[:-10])
    with pytest.raises(CorruptData, match="truncated"):
        fetch_frames(store, sid, [e])
    store.delete(key)
    with pytest.raises(CorruptData, match="missing"):
        fetch_frames(store, sid, entries)
