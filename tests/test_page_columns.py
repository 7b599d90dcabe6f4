"""Page entries as packed columns (records LOG4, checkpoints CKP4): the same maps as the
formats before them, which still decode, and every damage a bulk check must catch."""

from __future__ import annotations

import random
import struct
from array import array
from collections.abc import Callable

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap

from graft_vfs.core import envelope
from graft_vfs.core.checkpoint import CHECKPOINT_KIND, Checkpoint, Located, PageMap
from graft_vfs.core.commit import (
    RECORD_KIND,
    CommitRecord,
    PageEntries,
    SegmentRef,
    below_2_63,
    has_zero_u32,
    pack_column,
    unpack_column,
)
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.graft import encode_graft
from graft_vfs.core.ids import new_segment_id
from graft_vfs.core.segment import Entry
from support.old_formats import encode_ckp3, encode_log3


def entries(pages: list[int], rng: random.Random) -> list[Entry]:
    out, offset = [], 16
    for page in sorted(pages):
        length = rng.randint(1, 4200)
        out.append(Entry(page, offset, length, rng.getrandbits(32)))
        offset += length
    return out


def sid(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def record(page_count: int = 5000, segments: int = 4, seed: int = 1) -> CommitRecord:
    """A record of ``segments`` segments naming disjoint random pages below page_count."""
    rng = random.Random(seed)
    pages = rng.sample(range(page_count), page_count // 2)
    cut = len(pages) // segments
    refs = [
        SegmentRef(sid(rng), entries(pages[i * cut : (i + 1) * cut], rng)) for i in range(segments)
    ]
    return CommitRecord("v", b"i" * 16, 7, page_count, b"h" * 32, 1.5, refs)


def checkpoint(page_count: int = 5000, seed: int = 2) -> Checkpoint:
    rng = random.Random(seed)
    sids = [sid(rng) for _ in range(5)]
    pages = {
        e.page: Located(rng.randint(1, 9), rng.choice(sids), e)
        for e in entries(rng.sample(range(page_count), page_count - 10), rng)
    }
    return Checkpoint("v", b"i" * 16, 9, page_count, 2.5, pages)


# -- the same maps as the formats before ------------------------------------------------


def test_old_records_decode_to_the_same_record_as_new_ones() -> None:
    rec = record()
    new, old = CommitRecord.decode(rec.encode()), CommitRecord.decode(encode_log3(rec))
    assert new == old == rec
    assert new.encode()[4:8] == RECORD_KIND
    forked = CommitRecord("f", b"j" * 16, 1, 5000, b"h" * 32, 1.0, rec.segments, ("v", 7))
    assert CommitRecord.decode(encode_log3(forked)) == CommitRecord.decode(forked.encode())


def test_old_checkpoints_decode_to_the_same_map_as_new_ones() -> None:
    ckp = checkpoint()
    new, old = Checkpoint.decode(ckp.encode()), Checkpoint.decode(encode_ckp3(ckp))
    assert new == old == ckp
    assert new.pages == old.pages == ckp.pages
    assert new.segments() == old.segments() == ckp.segments()
    assert ckp.encode()[4:8] == CHECKPOINT_KIND


def test_a_page_map_finds_what_a_dict_finds() -> None:
    ckp = checkpoint()
    table = Checkpoint.decode(ckp.encode()).table
    for page in range(ckp.page_count + 5):
        assert table.locate(page) == ckp.pages.get(page)
    assert set(table.newer_than(4)) == {p for p, loc in ckp.pages.items() if loc.version > 4}
    assert PageMap.of(ckp.pages) == table and len(PageMap.empty()) == 0


def test_a_segment_finds_what_its_entries_say() -> None:
    rec = CommitRecord.decode(record().encode())
    for seg in rec.segments:
        by_page = {e.page: e for e in seg.entries}
        for page in range(rec.page_count):
            assert seg.columns.find(page) == by_page.get(page)
    assert SegmentRef("x", PageEntries.of(reversed(seg.entries))) == SegmentRef("x", seg.entries)


def test_a_checkpoint_edited_as_a_dict_encodes_the_edit() -> None:
    ckp = Checkpoint.decode(checkpoint().encode())
    page = min(ckp.pages)
    moved = Located(3, new_segment_id(), ckp.pages[page].entry)
    ckp.pages[page] = moved  # as compaction does
    assert Checkpoint.decode(ckp.encode()).pages[page] == moved


@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_bulk_zero_check_agrees_with_min(values: list[int]) -> None:
    assert has_zero_u32(struct.pack(f"<{len(values)}I", *values)) == (0 in values)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_bulk_offset_check_agrees_with_max(values: list[int]) -> None:
    packed = struct.pack(f"<{len(values)}Q", *values)
    assert below_2_63(packed) == all(v < 2**63 for v in values)


# -- damage a bulk check must catch -----------------------------------------------------


def edited_record(edit: Callable[[dict], None]) -> bytes:
    """A LOG4 record with its fields edited and a valid checksum (as a server bug, or an
    edit that knew the checksum, would leave it)."""
    fields = msgpack.unpackb(envelope.unseal(RECORD_KIND, record().encode(), "record"))
    edit(fields)
    return envelope.seal(RECORD_KIND, msgpack.packb(fields))


def column(fields: dict, name: str, edit: Callable[[list[int]], None], seg: int = 0) -> None:
    code = "Q" if name == "offsets" else "I"
    values = list(unpack_column(fields["segments"][seg][name], code, None, CorruptData))
    edit(values)
    fields["segments"][seg][name] = pack_column(array(code, values))


RECORD_DAMAGE: dict[str, Callable[[dict], None]] = {
    "truncated column": lambda f: f["segments"][0].update(pages=f["segments"][0]["pages"][:-1]),
    "a row short": lambda f: f["segments"][0].update(crcs=f["segments"][0]["crcs"][:-4]),
    "a row more": lambda f: column(f, "lengths", lambda c: c.append(5)),
    "a column missing": lambda f: f["segments"][0].pop("offsets"),
    "a list, not bytes": lambda f: f["segments"][0].update(pages=[1, 2, 3]),
    "page beyond the count": lambda f: column(f, "pages", lambda c: c.__setitem__(-1, 5000)),
    "unsorted": lambda f: column(f, "pages", lambda c: c.reverse()),
    "a page twice": lambda f: column(f, "pages", lambda c: c.__setitem__(1, c[0])),
    # (the segments are of equal size: seg 1 naming seg 0's pages is sorted and in range)
    "page in two segments": lambda f: f["segments"][1].update(pages=f["segments"][0]["pages"]),
    "zero length": lambda f: column(f, "lengths", lambda c: c.__setitem__(3, 0)),
    "offset of 2**63": lambda f: column(f, "offsets", lambda c: c.__setitem__(2, 2**63)),
    "bitmap of other pages": lambda f: f.update(pages=encode_graft(BitMap([1, 2, 3]))),
    "wrong page count": lambda f: f.update(page_count=10),
}


# What each damage is refused for (so that a check that lets it through fails the test,
# not a later one that happens to trip over it).
SAYS = {
    "truncated column": "not a whole number",
    "a row short": "integers, not",
    "a row more": "integers, not",
    "a column missing": "missing",
    "a list, not bytes": "not packed",
    "page beyond the count": "page count|outside",
    "unsorted": "not strictly ascending",
    "a page twice": "not strictly ascending",
    "page in two segments": "name a page twice",
    "zero length": "zero length",
    "offset of 2**63": "offset beyond",
    "bitmap of other pages": "bitmap does not match",
    "wrong page count": "page count",
    "version 0": "version outside",
    "version from the future": "version outside",
    "no such segment": "segment outside",
    "bad segment id": "invalid segment id",
}


@pytest.mark.parametrize("damage", list(RECORD_DAMAGE))
def test_damaged_new_records_are_corrupt_data(damage: str) -> None:
    with pytest.raises(CorruptData, match=SAYS[damage]):
        CommitRecord.decode(edited_record(RECORD_DAMAGE[damage]))


def test_truncated_records_and_checkpoints_are_corrupt_data() -> None:
    for data, decode in (
        (record().encode(), CommitRecord.decode),
        (checkpoint().encode(), Checkpoint.decode),
    ):
        for cut in (0, 7, 12, len(data) // 2, len(data) - 1):
            with pytest.raises(CorruptData):
                decode(data[:cut])  # type: ignore[operator]


def edited_checkpoint(edit: Callable[[dict], None]) -> bytes:
    body = envelope.unseal(CHECKPOINT_KIND, checkpoint().encode(), "checkpoint")
    fields = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body))
    edit(fields)
    return envelope.pack(CHECKPOINT_KIND, fields, compress=True)


CODES = {"pages": "I", "versions": "Q", "segments": "I", "offsets": "Q", "lengths": "I"}


def ckp_column(fields: dict, name: str, edit: Callable[[list[int]], None]) -> None:
    values = list(unpack_column(fields[name], CODES[name], None, CorruptData))
    edit(values)
    fields[name] = pack_column(array(CODES[name], values))


CHECKPOINT_DAMAGE: dict[str, Callable[[dict], None]] = {
    "truncated column": lambda f: f.update(versions=f["versions"][:-3]),
    "a row short": lambda f: f.update(lengths=f["lengths"][:-4]),
    "a column missing": lambda f: f.pop("crcs"),
    "page beyond the count": lambda f: ckp_column(f, "pages", lambda c: c.__setitem__(-1, 5000)),
    "unsorted": lambda f: ckp_column(f, "pages", lambda c: c.reverse()),
    "a page twice": lambda f: ckp_column(f, "pages", lambda c: c.__setitem__(1, c[0])),
    "version 0": lambda f: ckp_column(f, "versions", lambda c: c.__setitem__(0, 0)),
    "version from the future": lambda f: ckp_column(f, "versions", lambda c: c.__setitem__(0, 10)),
    "no such segment": lambda f: ckp_column(f, "segments", lambda c: c.__setitem__(0, 5)),
    "zero length": lambda f: ckp_column(f, "lengths", lambda c: c.__setitem__(0, 0)),
    "offset of 2**63": lambda f: ckp_column(f, "offsets", lambda c: c.__setitem__(0, 2**63)),
    "bad segment id": lambda f: f["sids"].__setitem__(0, "nope"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_new_checkpoints_are_corrupt_data(damage: str) -> None:
    with pytest.raises(CorruptData, match=SAYS[damage]):
        Checkpoint.decode(edited_checkpoint(CHECKPOINT_DAMAGE[damage]))


def test_an_undamaged_edit_decodes() -> None:
    """The edits above start from objects that decode: an edit that changes nothing does."""
    assert CommitRecord.decode(edited_record(lambda f: None)) == record()
    assert Checkpoint.decode(edited_checkpoint(lambda f: None)) == checkpoint()
