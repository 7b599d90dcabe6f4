"""The pure core: ids, segments, grafts, commit records, page-1 header fields."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap

from graft_vfs.core.commit import CommitRecord, SegmentRef, commit_hash
from graft_vfs.core.errors import CorruptData, InvalidRequest, InvalidVolumeId, UnsupportedDatabase
from graft_vfs.core.graft import decode_graft, encode_graft
from graft_vfs.core.ids import PAGE_SIZE, new_segment_id, validate_segment_id, validate_volume_id
from graft_vfs.core.pages import check_database_header, same_page1, with_counter
from graft_vfs.core.segment import decode_index, decode_segment, encode_segment
from support.frames import zstd_bomb


@pytest.mark.parametrize("name", ["orders", "a", "A.b-c_d", "9" * 128])
def test_valid_volume_ids(name):
    assert validate_volume_id(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "..", "a..b", ".hidden", "-x", "x" * 129, "a b", "é", None, 3]
)
def test_invalid_volume_ids(name):
    with pytest.raises(InvalidVolumeId, match="invalid volume name"):
        validate_volume_id(name)


@given(st.text(max_size=40))
def test_volume_ids_never_escape_a_prefix(name):
    try:
        validate_volume_id(name)
    except InvalidVolumeId:
        return
    assert "/" not in name and ".." not in name and name[0].isalnum()


def test_segment_ids_are_unique_and_valid():
    ids = {new_segment_id() for _ in range(1000)}
    assert len(ids) == 1000
    for sid in ids:
        validate_segment_id(sid)
    with pytest.raises(InvalidRequest):
        validate_segment_id("../../etc/passwd")


def _page(seed: int) -> bytes:
    return (struct.pack(">I", seed) * (PAGE_SIZE // 4))[:PAGE_SIZE]


def test_segment_roundtrip_and_random_access():
    pages = [(p, _page(p)) for p in (7, 1, 300, 2)]
    data, index = encode_segment(pages)
    assert [e.page for e in index] == [1, 2, 7, 300]
    assert decode_segment(data) == sorted(pages)
    assert decode_index(data) == index
    e = index[2]
    from graft_vfs.core.segment import decode_page

    assert decode_page(e, data[e.offset : e.offset + e.length]) == _page(7)


def test_segment_corruption_is_detected_never_returned():
    data, index = encode_segment([(p, os.urandom(64) * 64) for p in range(4)])
    for pos in (3, 20, index[0].offset + 5, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        with pytest.raises(CorruptData):
            decode_segment(bytes(flipped))
    with pytest.raises(CorruptData):
        decode_segment(data[:-10])


def test_segment_refuses_wrong_page_size():
    with pytest.raises(InvalidRequest):
        encode_segment([(0, b"short")])


@given(st.sets(st.integers(min_value=0, max_value=2**31 - 1), max_size=200))
def test_graft_roundtrip(pages):
    assert decode_graft(encode_graft(pages)) == BitMap(pages)


@pytest.mark.parametrize("junk", [b"\x00\x01garbage", bytes(range(7, 250, 7)), "text", 5])
def test_malformed_graft_is_invalid_request(junk):
    with pytest.raises(InvalidRequest):
        decode_graft(junk)


def test_commit_record_roundtrip_and_hash_is_content_based():
    data, index = encode_segment([(0, _page(1)), (5, _page(2))])
    segments = [SegmentRef(new_segment_id(), index)]
    rec = CommitRecord("orders", b"i" * 16, 3, 6, b"h" * 32, 1.5, segments)
    back = CommitRecord.decode(rec.encode())
    assert back == rec and list(back.pages()) == [0, 5]
    h1 = commit_hash("orders", 2, 6, [(5, _page(2)), (0, _page(1))])
    assert h1 == commit_hash("orders", 2, 6, [(0, _page(1)), (5, _page(2))])
    assert h1 != commit_hash("orders", 2, 6, [(0, _page(1)), (5, _page(3))])
    assert h1 != commit_hash("orders", 3, 6, [(0, _page(1)), (5, _page(2))])
    with pytest.raises(CorruptData):
        CommitRecord.decode(b"\x93garbage")


def test_page1_counter_fields_are_served_from_the_snapshot():
    page1 = bytearray(os.urandom(PAGE_SIZE))
    served = with_counter(bytes(page1), 77)
    assert served[24:28] == served[92:96] == struct.pack(">I", 77)
    assert same_page1(bytes(page1), served)
    page1[28] ^= 1  # the in-header database size is real content
    assert not same_page1(bytes(page1), served)


def test_database_header_checks_say_how_to_fix():
    header = bytearray(b"SQLite format 3\x00" + bytes(84))
    header[16:18] = struct.pack(">H", 1024)
    with pytest.raises(UnsupportedDatabase, match="VACUUM INTO"):
        check_database_header(bytes(header), "app.db")
    header[16:18] = struct.pack(">H", 4096)
    header[18] = header[19] = 2
    with pytest.raises(UnsupportedDatabase, match="journal_mode=DELETE"):
        check_database_header(bytes(header), "app.db")
    with pytest.raises(UnsupportedDatabase, match="not a SQLite database"):
        check_database_header(b"hello" * 30, "notes.txt")


def test_btree_interior_children_match_sqlite(tmp_path):
    import apsw

    from graft_vfs.core.btree import interior_children, is_interior

    path = str(tmp_path / "bt.db")
    con = apsw.Connection(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    with con:
        con.executemany("INSERT INTO t VALUES(?, ?)", ((i, "x" * 300) for i in range(5000)))
    (root,) = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 't'").fetchone()
    con.close()
    data = open(path, "rb").read()
    pages = [data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    children = interior_children(pages[root - 1], root - 1)
    assert is_interior(pages[root - 1], root - 1) and len(children) > 10
    # every child is a leaf of the table (type 13), and each holds some of its rows
    assert all(pages[c][0] == 13 for c in children)
    assert interior_children(pages[children[0]], children[0]) == []
    assert interior_children(b"\x05" + bytes(10), 3) == []  # damaged: no children


def _one_page_segment(frame: bytes, page: int = 0) -> bytes:
    from graft_vfs.core.segment import encode_frames

    return encode_frames([(page, frame)])[0]


def test_a_frame_is_refused_unless_it_declares_exactly_one_page():
    """A frame's declared size is checked before zstd allocates it (issue: 2 GiB bombs)."""
    import zstandard

    from graft_vfs.core.segment import decompress_page

    assert decompress_page(zstd_bomb(PAGE_SIZE), 3) == bytes(PAGE_SIZE)
    for declared in (64 << 20, PAGE_SIZE + 1, PAGE_SIZE - 1):
        with pytest.raises(CorruptData, match=f"declares {declared} bytes, not {PAGE_SIZE}"):
            decompress_page(zstd_bomb(declared), 3)
        with pytest.raises(CorruptData, match="declares"):
            decode_segment(_one_page_segment(zstd_bomb(declared)))
    # A client checks read answers with decode_page: a bomb with a valid crc is refused.
    from graft_vfs.core.segment import Entry, decode_page, frame_crc

    bomb = zstd_bomb(1 << 30)
    with pytest.raises(CorruptData, match="declares 1073741824 bytes"):
        decode_page(Entry(3, 0, len(bomb), frame_crc(3, bomb)), bomb)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(_page(1))
    with pytest.raises(CorruptData, match="declares no size"):
        decompress_page(unsized, 3)


@pytest.mark.parametrize("extra", [b"\0", b"garbage", "second frame"])
def test_a_frame_with_anything_after_it_is_refused(extra):
    import zstandard

    frame = zstandard.ZstdCompressor().compress(_page(1))
    tail = frame if extra == "second frame" else extra
    assert isinstance(tail, bytes)
    with pytest.raises(CorruptData, match="one frame"):
        decode_segment(_one_page_segment(frame + tail))


@pytest.mark.parametrize("page", [1 << 31, 1 << 32, 1 << 40])
def test_page_numbers_out_of_range_are_corrupt(page):
    import zstandard

    data = _one_page_segment(zstandard.ZstdCompressor().compress(_page(1)), page)
    with pytest.raises(CorruptData, match="out of range"):
        decode_index(data)


def test_segments_hold_at_most_what_a_client_sends_at_once(monkeypatch):
    import zstandard

    from graft_vfs.core import segment
    from graft_vfs.core.protocol import MAX_INLINE_PAGES

    assert segment.MAX_SEGMENT_PAGES == MAX_INLINE_PAGES == 2048
    frame = zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE))
    frames = [(p, frame) for p in range(segment.MAX_SEGMENT_PAGES + 1)]
    with pytest.raises(InvalidRequest, match="at most 2048"):
        segment.encode_frames(frames)
    monkeypatch.setattr(segment, "MAX_SEGMENT_PAGES", 1 << 20)  # write one anyway
    data, _ = segment.encode_frames(frames)
    monkeypatch.undo()
    with pytest.raises(CorruptData, match="out of range"):
        decode_segment(data)
    assert len(decode_segment(segment.encode_frames(frames[:-1])[0])) == 2048


def test_stores_of_the_first_segment_format_are_refused_with_the_fix() -> None:
    """Format 1 frame crcs did not cover the page number: refused, never half-trusted."""
    from graft_vfs.core import envelope
    from graft_vfs.core.checkpoint import Checkpoint
    from graft_vfs.core.commit import CommitRecord
    from graft_vfs.core.segment import OLD_MAGIC, frame_crc

    data, entries = encode_segment([(5, _page(5))])
    assert entries[0].crc == frame_crc(5, data[entries[0].offset :])
    assert entries[0].crc != frame_crc(6, data[entries[0].offset :])
    with pytest.raises(CorruptData, match="format 1 .* import it anew"):
        decode_index(OLD_MAGIC + data[len(OLD_MAGIC) :])
    for kind, decode in ((b"LOG2", CommitRecord.decode), (b"CKP2", Checkpoint.decode)):
        with pytest.raises(CorruptData, match="before frame checksums bound their page"):
            decode(envelope.seal(kind, b"\x80"))
