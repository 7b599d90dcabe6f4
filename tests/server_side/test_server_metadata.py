"""Metadata integrity: every object the server writes is checksummed and range-checked.

A log record, checkpoint, GC floor, store identity or GC pending list that is damaged
or edited is ``corrupt_data`` (500), never data and never a 400; a commit whose hash is
not the hash of its pages is a 400, never mistaken for a commit that landed.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable

import msgpack
import pytest
import urllib3
import zstandard
from pyroaring import BitMap

from graft_server.compaction import write_checkpoint
from graft_server.keys import checkpoint_key, log_key, retention_key
from graft_server.objstore import MemoryStore
from graft_server.volumes import Volumes
from graft_vfs.core import envelope
from graft_vfs.core.checkpoint import CHECKPOINT_KIND, Checkpoint
from graft_vfs.core.commit import RECORD_KIND, CommitRecord, commit_hash, pack_column, unpack_column
from graft_vfs.core.errors import CorruptData
from graft_vfs.core.identity import STORE_KEY, decode_store, encode_store
from graft_vfs.core.retention import decode_floor, decode_pending, encode_floor, encode_pending
from graft_vfs.core.segment import encode_segment, frame_crc
from support.commits import call, commit, commit_body, random_page

PAGES = 6


def volume_with_checkpoint(store, vid: str = "v") -> Volumes:
    """A volume of PAGES distinct pages over 3 LSNs, with a checkpoint at LSN 3."""
    vols = Volumes(store)
    commit(vols, vid, 0, PAGES, {p: random_page(p) for p in range(PAGES)})
    commit(vols, vid, 1, PAGES, {0: random_page(100)})
    commit(vols, vid, 2, PAGES, {1: random_page(101)})
    write_checkpoint(vols.index, vid, 3)
    return vols


def objects() -> dict[str, tuple[bytes, Callable[[bytes], object]]]:
    store = MemoryStore()
    volume_with_checkpoint(store)
    return {
        "log record": (store.get(log_key("v", 2)), CommitRecord.decode),
        "checkpoint": (store.get(checkpoint_key("v", 3)), Checkpoint.decode),
        "floor": (encode_floor(2), decode_floor),
        "store identity": (encode_store(), decode_store),
        "gc pending": (encode_pending({"0" * 32: 1.5}), decode_pending),
    }


@pytest.mark.parametrize("kind", list(objects()))
def test_every_single_bit_flip_is_refused(kind: str) -> None:
    data, decode = objects()[kind]
    decode(data)
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptData):
            decode(bytes(damaged))
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptData):
            decode(data[:cut])


# A checkpoint's packed columns (CKP4), each edited as a list of integers.
COLUMNS = {
    "pages": "I",
    "versions": "Q",
    "segments": "I",
    "offsets": "Q",
    "lengths": "I",
    "crcs": "I",
}


def edit_columns(fields: dict, edit: Callable[[dict[str, list[int]]], None]) -> None:
    cols = {
        name: list(unpack_column(fields[name], code, None, CorruptData))
        for name, code in COLUMNS.items()
    }
    edit(cols)
    for name, code in COLUMNS.items():
        fields[name] = pack_column(array(code, cols[name]))


def edit_checkpoint(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """The checkpoint with its map edited and recompressed, its original checksum kept."""
    body = envelope.unseal(CHECKPOINT_KIND, data, "checkpoint")
    fields = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body))
    edit(fields)
    new_body = zstandard.ZstdCompressor(level=3).compress(msgpack.packb(fields))
    resealed = envelope.seal(CHECKPOINT_KIND, new_body)
    return resealed[:-4] + data[-4:]  # an edit cannot know the checksum of its result


def swap_pages_0_and_1(fields: dict) -> None:
    # Each page keeps a valid (offset, length, crc) triple: only the map lies.
    def swap(cols: dict[str, list[int]]) -> None:
        for name in ("segments", "offsets", "lengths", "crcs"):
            cols[name][0], cols[name][1] = cols[name][1], cols[name][0]

    edit_columns(fields, swap)


def test_swapped_page_map_is_corrupt_data_not_rows() -> None:
    store = MemoryStore()
    volume_with_checkpoint(store)
    key = checkpoint_key("v", 3)
    store.put(key, edit_checkpoint(store.get(key), swap_pages_0_and_1))
    cold = Volumes(store)
    with pytest.raises(CorruptData, match="checksum"):
        cold.reads.read("v", 3, BitMap([0, 1]))


def test_resealed_edits_are_range_checked() -> None:
    """Even with a valid checksum, a map that breaks its own rules is refused."""
    store = MemoryStore()
    volume_with_checkpoint(store)
    data = store.get(checkpoint_key("v", 3))

    def resealed(edit: Callable[[dict], None]) -> bytes:
        body = envelope.unseal(CHECKPOINT_KIND, data, "checkpoint")
        fields = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body))
        edit(fields)
        return envelope.pack(CHECKPOINT_KIND, fields, compress=True)

    def beyond_page_count(f: dict) -> None:
        edit_columns(f, lambda c: c["pages"].__setitem__(-1, f["page_count"]))

    def unsorted(f: dict) -> None:
        edit_columns(f, lambda c: c["pages"].reverse())

    def version_from_the_future(f: dict) -> None:
        edit_columns(f, lambda c: c["versions"].__setitem__(0, f["lsn"] + 1))

    def no_such_segment(f: dict) -> None:
        edit_columns(f, lambda c: c["segments"].__setitem__(0, len(f["sids"])))

    def zero_length(f: dict) -> None:
        edit_columns(f, lambda c: c["lengths"].__setitem__(0, 0))

    def short_column(f: dict) -> None:
        f["crcs"] = f["crcs"][:-4]

    def bool_for_int(f: dict) -> None:
        f["page_count"] = True

    def short_identity(f: dict) -> None:
        f["volume_id"] = b"x"

    for edit in (
        beyond_page_count,
        unsorted,
        version_from_the_future,
        no_such_segment,
        zero_length,
        short_column,
        bool_for_int,
        short_identity,
    ):
        with pytest.raises(CorruptData):
            Checkpoint.decode(resealed(edit))


def test_log_record_page_count_edit_is_refused() -> None:
    store = MemoryStore()
    volume_with_checkpoint(store)
    data = store.get(log_key("v", 2))
    body = envelope.unseal(RECORD_KIND, data, "commit record")
    fields = msgpack.unpackb(body)
    fields["page_count"] += 1
    edited = envelope.seal(RECORD_KIND, msgpack.packb(fields))
    with pytest.raises(CorruptData, match="checksum"):
        CommitRecord.decode(edited[:-4] + data[-4:])


def test_unchecksummed_objects_of_older_servers_are_refused_with_the_fix() -> None:
    old_record = msgpack.packb({"v": 1, "vid": "v", "lsn": 1, "page_count": 0})
    old_floor = msgpack.packb({"floor": 3})
    for decode, data in ((CommitRecord.decode, old_record), (decode_floor, old_floor)):
        with pytest.raises(CorruptData, match="export the volume"):
            decode(data)


# -- through a real server process, on a directory store and on S3 --------------------


def read_body(lsn: int) -> dict:
    return {"lsn": lsn, "pages": BitMap(range(PAGES)).serialize()}


def flip(data: bytes, position: int) -> bytes:
    damaged = bytearray(data)
    damaged[position % len(data)] ^= 0x10
    return bytes(damaged)


def fill_volume(url: str, vid: str) -> None:
    first = commit_body(vid, 0, PAGES, {p: random_page(p) for p in range(PAGES)})
    assert call("POST", f"{url}/v1/volumes/{vid}/commit", first)[0] == 200
    second = commit_body(vid, 1, PAGES, {0: random_page(100)})
    assert call("POST", f"{url}/v1/volumes/{vid}/commit", second)[0] == 200


@pytest.mark.parametrize("target", ["log record", "checkpoint", "floor", "store"])
def test_damaged_metadata_is_500_corrupt_data(own_server, target: str) -> None:
    """A bit flipped at four positions (first byte, header, middle, last byte), each read
    by a cold server. A volume's own objects are damaged in four volumes, one position
    each, so one cold server reads them all; the store identity is one object, so each
    of its positions gets a cold server of its own."""
    srv = own_server.start()
    vids = ["damaged"] if target == "store" else [f"damaged{i}" for i in range(4)]
    for vid in vids:
        fill_volume(srv.url, vid)
        write_checkpoint(Volumes(srv._backing()).index, vid, 2)
        srv._backing().put(retention_key(vid), encode_floor(1))

    def key_of(vid: str) -> str:
        return {
            "log record": log_key(vid, 1),
            "checkpoint": checkpoint_key(vid, 2),
            "floor": retention_key(vid),
            "store": STORE_KEY,
        }[target]

    def positions(data: bytes) -> list[int]:
        return [0, 9, len(data) // 2, len(data) - 1]

    def served_cold(damaged: dict[str, int]) -> None:
        """Each volume of ``damaged`` (volume: flipped position) is refused, never served."""
        srv.start()  # a cold server: nothing of the objects is cached
        for vid, position in damaged.items():
            answers = [call("GET", f"{srv.url}/v1/volumes/{vid}")]
            answers.append(call("POST", f"{srv.url}/v1/volumes/{vid}/read", read_body(1)))
            answers.append(call("GET", f"{srv.url}/v1/volumes/{vid}/log/1"))
            failed = [(status, body.get("error")) for status, body in answers if status != 200]
            assert failed, f"a damaged {target} was served (bit flipped at {position})"
            assert set(failed) == {(500, "corrupt_data")}, (position, failed)
        srv.stop()

    originals = {vid: srv.read_object(key_of(vid)) for vid in vids}
    assert all(data is not None for data in originals.values())
    srv.stop()
    if target == "store":
        (vid,) = vids
        for position in positions(originals[vid]):
            srv.write_object(key_of(vid), flip(originals[vid], position))
            served_cold({vid: position})
    else:
        damaged = {vid: positions(originals[vid])[i] for i, vid in enumerate(vids)}
        for vid, position in damaged.items():
            srv.write_object(key_of(vid), flip(originals[vid], position))
        served_cold(damaged)
    for vid, data in originals.items():
        srv.write_object(key_of(vid), data)


def test_swapped_checkpoint_never_reaches_a_fresh_replica(own_server, client) -> None:
    srv = own_server.start()
    vid = "swapped"
    fill_volume(srv.url, vid)
    write_checkpoint(Volumes(srv._backing()).index, vid, 2)
    key = checkpoint_key(vid, 2)
    srv.stop()
    srv.write_object(key, edit_checkpoint(srv.read_object(key), swap_pages_0_and_1))
    srv.start()
    status, body = call("POST", f"{srv.url}/v1/volumes/{vid}/read", read_body(2))
    assert (status, body["error"]) == (500, "corrupt_data")


def test_commit_with_a_landed_hash_but_other_pages_is_400(server) -> None:
    vid = f"hash-{random.randrange(1 << 30)}"
    first = commit_body(vid, 0, PAGES, {p: random_page(p) for p in range(PAGES)})
    assert call("POST", f"{server.url}/v1/volumes/{vid}/commit", first)[0] == 200
    other = commit_body(vid, 0, PAGES, {p: random_page(50 + p) for p in range(PAGES)})
    forged = {**other, "hash": first["hash"]}
    status, body = call("POST", f"{server.url}/v1/volumes/{vid}/commit", forged)
    assert (status, body["error"]) == (400, "invalid_request")
    assert "is not the hash of the commit's pages" in body["message"]
    # A new LSN with a wrong hash is refused too, and nothing is written.
    wrong = {**commit_body(vid, 1, PAGES, {0: random_page(7)}), "hash": bytes(32)}
    status, body = call("POST", f"{server.url}/v1/volumes/{vid}/commit", wrong)
    assert (status, body["error"]) == (400, "invalid_request")
    assert call("GET", f"{server.url}/v1/volumes/{vid}")[1]["lsn"] == 1
    # The genuine retry is still recognised.
    assert call("POST", f"{server.url}/v1/volumes/{vid}/commit", first)[1]["lsn"] == 1
    frames = call("POST", f"{server.url}/v1/volumes/{vid}/read", read_body(1))[1]["pages"]
    dctx = zstandard.ZstdDecompressor()
    assert [dctx.decompress(f[3]) for f in frames] == [random_page(p) for p in range(PAGES)]
    assert all(frame_crc(f[0], f[3]) == f[2] for f in frames)


def test_commit_hash_covers_uploaded_segments(server) -> None:
    vid = f"hash-up-{random.randrange(1 << 30)}"
    pages = {p: random_page(p) for p in range(PAGES)}
    sids = []
    for chunk in ((0, 1, 2), (3, 4, 5)):
        seg = encode_segment([(p, pages[p]) for p in chunk])[0]
        r = urllib3.request(
            "POST",
            f"{server.url}/v1/segments",
            body=seg,
            headers={"content-type": "application/octet-stream"},
        )
        sids.append(msgpack.unpackb(r.data)["sid"])
    body = {"base": 0, "page_count": PAGES, "segments": sids}
    wrong = {**body, "hash": commit_hash(vid, 0, PAGES, {**pages, 5: random_page(99)}.items())}
    status, answer = call("POST", f"{server.url}/v1/volumes/{vid}/commit", wrong)
    assert (status, answer["error"]) == (400, "invalid_request")
    right = {**body, "hash": commit_hash(vid, 0, PAGES, pages.items())}
    assert call("POST", f"{server.url}/v1/volumes/{vid}/commit", right)[1]["lsn"] == 1
