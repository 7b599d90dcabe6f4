"""The page map as columns: a store written in the formats before (LOG3 records, CKP3
checkpoints) loads to the same answers as one written now, and a long-running process
(commits folded into per-page LSN lists) answers as a cold one does."""

from __future__ import annotations

import random

from pyroaring import BitMap

from graft_server import index as index_module
from graft_server.keys import VOLUMES_PREFIX
from graft_server.objstore import MemoryStore
from graft_server.volumes import Volumes
from graft_vfs.core.checkpoint import Checkpoint
from graft_vfs.core.commit import CommitRecord
from graft_vfs.core.ids import PAGE_SIZE
from support.commits import commit, contents, random_page
from support.old_formats import encode_ckp3, encode_log3

VID = "v"


def history(vols: Volumes, commits: int, seed: int = 3) -> dict[int, list[bytes]]:
    """Commits of random pages (growing, truncating, growing back), LSN -> its contents."""
    rng = random.Random(seed)
    count = 40
    expected: dict[int, list[bytes]] = {}
    current = [random_page(rng.getrandbits(32)) for _ in range(count)]
    commit(vols, VID, 0, count, dict(enumerate(current)))
    expected[1] = list(current)
    for lsn in range(1, commits):
        new_count = max(5, count + rng.choice((-7, 0, 0, 3, 9)))
        changed = {p: random_page(rng.getrandbits(32)) for p in rng.sample(range(new_count), 4)}
        changed.update({p: random_page(rng.getrandbits(32)) for p in range(count, new_count)})
        commit(vols, VID, lsn, new_count, changed)
        current = (current + [bytes(PAGE_SIZE)] * new_count)[:new_count]
        for p, data in changed.items():
            current[p] = data
        count = new_count
        expected[lsn + 1] = list(current)
    return expected


def answers(vols: Volumes, lsns: range) -> dict[str, object]:
    """Everything a client can ask of the volume, at every LSN of ``lsns``."""
    return {
        "contents": {lsn: contents(vols, VID, lsn) for lsn in lsns},
        "pulls": {since: vols.reads.pull(VID, since) for since in range(lsns.stop)},
        "checkpoints": {lsn: vols.index.checkpoint(VID, lsn) for lsn in lsns[-3:]},
        "opening": vols.reads.opening(VID, 64),
    }


def rewritten_in_old_formats(store: MemoryStore) -> MemoryStore:
    old = MemoryStore()
    kinds = set()
    for key in store.list(""):
        data = store.get(key)
        assert data is not None
        if key.startswith(VOLUMES_PREFIX) and "/log/" in key:
            data = encode_log3(CommitRecord.decode(data))
        elif key.startswith(VOLUMES_PREFIX) and "/checkpoints/" in key:
            data = encode_ckp3(Checkpoint.decode(data))
        kinds.add(data[4:8])
        old.put(key, data)
    assert {b"LOG3", b"CKP3"} <= kinds and not {b"LOG4", b"CKP4"} & kinds
    return old


def test_a_store_written_in_the_old_formats_answers_as_a_new_one() -> None:
    store = MemoryStore()
    expected = history(Volumes(store, checkpoint_every=5), 13)
    lsns = range(1, 14)
    new = answers(Volumes(store), lsns)  # cold: the latest checkpoint and records after it
    assert new["contents"] == {lsn: expected[lsn] for lsn in lsns}
    old = answers(Volumes(rewritten_in_old_formats(store)), lsns)
    assert old == new


def test_a_long_running_process_answers_as_a_cold_one(monkeypatch) -> None:
    """More commits than FOLD_AFTER since the base: the older ones are folded into per-page
    LSN lists, the rest found by their bitmaps; the answers are the same either way."""
    monkeypatch.setattr(index_module, "FOLD_AFTER", 4)
    store = MemoryStore()
    warm = Volumes(store, checkpoint_every=1000)  # no checkpoint: base 0, all 15 in memory
    expected = history(warm, 15)
    vol = warm.index.volume(VID)
    assert vol.folded > 4 and vol.written and vol.latest - vol.folded <= 4
    lsns = range(1, 16)
    ours = answers(warm, lsns)
    assert ours["contents"] == {lsn: expected[lsn] for lsn in lsns}
    monkeypatch.setattr(index_module, "FOLD_AFTER", 1000)  # a cold load folds nothing
    cold = Volumes(store)
    assert answers(cold, lsns) == ours
    assert not cold.index.volume(VID).written


def test_locate_and_checkpoint_agree_with_a_dict_of_every_version(monkeypatch) -> None:
    """The columns and bitmaps against the simplest model: page -> {LSN: where}."""
    monkeypatch.setattr(index_module, "FOLD_AFTER", 3)
    store = MemoryStore()
    vols = Volumes(store, checkpoint_every=4)
    history(vols, 11)
    cold = Volumes(store)
    vol = cold.index.volume(VID)
    with vol.lock:
        cold.index.refresh(vol)
        assert vol.base == 8 and vol.latest == 11
        model = {p: {vol.base: loc} for p, loc in vol.base_map.to_dict().items()}
        for lsn in range(vol.base + 1, vol.latest + 1):
            for p, (sid, entry) in vol.commit_at(lsn).pages.items():
                model.setdefault(p, {})[lsn] = (sid, entry)
        for lsn in range(vol.base, vol.latest + 1):
            for page in range(vol.page_count_at(lsn) + 3):
                versions = [v for v in model.get(page, {}) if v <= lsn]
                loc = vol.locate(page, lsn)
                if not versions:
                    assert loc is None
                    continue
                newest = max(versions)
                if newest == vol.base:  # the base checkpoint's version, as it says
                    assert loc == model[page][newest]
                else:
                    assert loc is not None and loc.version == newest
                    assert (loc.sid, loc.entry) == model[page][newest]
            ckp = vol.checkpoint(lsn)
            assert BitMap(ckp.pages) == BitMap(
                p for p in range(vol.page_count_at(lsn)) if vol.locate(p, lsn) is not None
            )
            assert all(ckp.pages[p] == vol.locate(p, lsn) for p in ckp.pages)
