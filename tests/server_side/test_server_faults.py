"""The commit and read paths under injected store faults: all or nothing, never wrong data."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from graft_server.objstore import MemoryStore
from graft_server.volumes import Volumes
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import CommitConflict, CorruptData, StorageError
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.segment import encode_segment

sys.path.insert(0, str(Path(__file__).parent.parent))
from support.faulty import CALLS, KINDS, FaultPlan, FaultyStore  # noqa: E402

TRANSIENT = (StorageError, CorruptData)  # what a faulty store may cause; both are retried
PAGES = 6


def page(rng: random.Random) -> bytes:
    return rng.randbytes(32) * (PAGE_SIZE // 32)


def read_all(vols: Volumes, lsn: int, count: int) -> dict[int, bytes]:
    dctx = zstandard.ZstdDecompressor()
    frames = vols.reads.read("v", lsn, BitMap(range(count)))
    return {f.page: dctx.decompress(f.frame) for f in frames}


def until_done(fn, *args, **kwargs):
    """Retry a call through transient faults, as a client retries with the same hash."""
    for _ in range(200):
        try:
            return fn(*args, **kwargs)
        except TRANSIENT:
            continue
    raise AssertionError("faults never let the call through")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rate=st.sampled_from([0.02, 0.05, 0.1]))
def test_commits_and_reads_under_faults(seed: int, rate: float) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner, FaultPlan.everywhere(rate, seed=seed, delay=0.0))
    servers = [Volumes(faulty, checkpoint_every=4) for _ in range(3)]  # three processes
    rng = random.Random(seed)
    history: list[dict[int, bytes]] = [{}]  # the model: content per LSN
    bases = [0, 0]  # two clients, each with the LSN it last saw
    wrong = 0
    for _ in range(40):
        c = rng.randrange(2)
        srv = rng.choice(servers)
        if rng.random() < 0.3 and len(history) > 1:  # a read at a random LSN
            lsn = rng.randrange(1, len(history))
            try:
                got = read_all(srv, lsn, PAGES)
            except TRANSIENT:
                continue  # an error is fine; wrong data is not
            wrong += got != history[lsn]
            continue
        base = bases[c]
        changed = {p: page(rng) for p in rng.sample(range(PAGES), rng.randint(1, 3))}
        if base == 0:
            changed = {p: page(rng) for p in range(PAGES)}  # the first commit writes all
        segment = encode_segment(changed.items())[0]
        digest = commit_hash("v", base, PAGES, changed.items())
        try:
            lsn = until_done(srv.commits.commit, "v", base, PAGES, digest, segment=segment)
        except CommitConflict as exc:
            bases[c] = exc.latest_lsn or 0
            continue
        assert lsn == base + 1 == len(history), "an acknowledged LSN is not the next one"
        history.append({**history[base], **changed})
        bases[c] = lsn
    assert wrong == 0, "a read returned wrong data"
    faulty.enabled = False
    cold = Volumes(inner)  # a fresh process: everything acknowledged, nothing else
    assert cold.reads.head("v").lsn == len(history) - 1
    keys = inner.list("volumes/v/log/")
    assert [int(k.rsplit("/", 1)[1]) for k in keys] == list(range(1, len(history)))
    for lsn in range(1, len(history)):
        assert read_all(cold, lsn, PAGES) == history[lsn]
    assert sum(faulty.injected.values()) > 0 or rate * 40 < 1


# Each store call, as the test drives it, on a store holding "a/0" and "a/1".
DRIVE = {
    "get": lambda store: store.get("a/1"),
    "get_range": lambda store: store.get_range("a/1", 0, 10),
    "put": lambda store: store.put("a/2", b"x"),
    "put_if_absent": lambda store: store.put_if_absent("a/2", b"x"),
    "list": lambda store: store.list("a/"),
    "delete": lambda store: store.delete("a/1"),
}
# What a "partial" fault makes of each call: a read cut in half, or a write that landed
# though its answer was an error.
PARTIAL_READS = {"get": b"01234", "get_range": b"01234", "list": ["a/0"]}


def two_objects() -> MemoryStore:
    store = MemoryStore()
    store.put("a/0", b"z")
    store.put("a/1", b"0123456789")
    return store


def contents(store: MemoryStore) -> dict[str, bytes | None]:
    return {key: store.get(key) for key in store.list("")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", CALLS)
def test_each_fault_kind_of_each_call_is_injected(call: str, kind: str) -> None:
    assert set(DRIVE) == set(CALLS)
    clean = two_objects()
    expected_result = DRIVE[call](clean)  # what the call does without faults
    inner = two_objects()
    faulty = FaultyStore(inner, FaultPlan({call: {kind: 1.0}}, delay=0.05))
    started = time.monotonic()
    if kind == "fail":
        with pytest.raises(StorageError, match=f"injected fault: {call} "):
            DRIVE[call](faulty)
        assert contents(inner) == contents(two_objects())  # a failed call changes nothing
    elif kind == "delay":
        assert DRIVE[call](faulty) == expected_result
        assert time.monotonic() - started >= faulty.plan.delay
        assert contents(inner) == contents(clean)
    elif call in PARTIAL_READS:
        assert DRIVE[call](faulty) == PARTIAL_READS[call]
        assert contents(inner) == contents(two_objects())
    else:
        with pytest.raises(StorageError, match=r"\(landed\)"):
            DRIVE[call](faulty)
        assert contents(inner) == contents(clean)  # the write landed; only its answer was lost
    assert {k: n for k, n in faulty.injected.items() if n} == {f"{call}.{kind}": 1}
    faulty.enabled = False
    again, fresh = two_objects(), two_objects()
    faulty.inner = again
    assert DRIVE[call](faulty) == DRIVE[call](fresh) and contents(again) == contents(fresh)


def test_a_read_damaged_in_transit_is_read_again() -> None:
    inner = MemoryStore()
    vols = Volumes(inner)
    data = {p: random.Random(p).randbytes(PAGE_SIZE) for p in range(4)}
    digest = commit_hash("v", 0, 4, data.items())
    vols.commits.commit("v", 0, 4, digest, segment=encode_segment(data.items())[0])

    class OnceShort:
        """Every first ranged read comes back cut in half; the retry is whole."""

        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name):
            return getattr(inner, name)

        def get_range(self, key, start, length):
            self.calls += 1
            got = inner.get_range(key, start, length)
            return got[: len(got) // 2] if self.calls % 2 and got else got

    flaky = OnceShort()
    reader = Volumes(flaky)  # type: ignore[arg-type]
    dctx = zstandard.ZstdDecompressor()
    frames = reader.reads.read("v", 1, BitMap(range(4)))
    assert {f.page: dctx.decompress(f.frame) for f in frames} == data
    assert flaky.calls == 2
