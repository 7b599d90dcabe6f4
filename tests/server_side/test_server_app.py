"""The HTTP edge in-process (starlette TestClient): routes, error mapping, hostile bodies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap
from starlette.testclient import TestClient

from graft_server.app import create_app
from graft_server.objstore import MemoryStore
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import StorageError
from graft_vfs.core.segment import encode_segment
from support.commits import commit_body, page

MSGPACK = {"content-type": "application/x-msgpack"}
GRAFT_1 = BitMap([1]).serialize()  # page 1: beyond a 1-page volume
GRAFT_4097 = BitMap(range(4097)).serialize()  # over MAX_PAGES_PER_READ


def post(client: TestClient, path: str, body: object) -> Any:
    return client.post(path, content=msgpack.packb(body), headers=MSGPACK)


def snapshot_of(store: MemoryStore) -> dict[str, bytes | None]:
    return {key: store.get(key) for key in store.list("")}


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(store: MemoryStore) -> Iterator[TestClient]:
    with TestClient(create_app(store, max_body=256 * 1024)) as c:
        yield c


def test_health_and_listing(client: TestClient) -> None:
    health = client.get("/v1/health")
    assert health.status_code == 200 and health.json()["ok"] is True
    assert client.get("/v1/volumes").json() == {"volumes": []}
    post(client, "/v1/volumes/v/commit", commit_body("v", 0, 1, {0: page(1)}))
    assert client.get("/v1/volumes").json() == {
        "volumes": [{"vid": "v", "lsn": 1, "page_count": 1}]
    }


def test_commit_pull_read_roundtrip(client: TestClient) -> None:
    r = post(client, "/v1/volumes/v/commit", commit_body("v", 0, 2, {0: page(1), 1: page(2)}))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-msgpack"
    committed = msgpack.unpackb(r.content)
    identity = {"volume_id": committed["volume_id"], "store_id": committed["store_id"]}
    assert committed == {"lsn": 1, **identity}
    assert len(identity["volume_id"]) == len(identity["store_id"]) == 16

    snap = msgpack.unpackb(client.get("/v1/volumes/v").content)
    assert snap == {"vid": "v", "lsn": 1, "page_count": 2, **identity}

    pulled = msgpack.unpackb(post(client, "/v1/volumes/v/pull", {"since": 0}).content)
    assert (pulled["vid"], pulled["lsn"], pulled["page_count"]) == ("v", 1, 2)
    assert {"volume_id": pulled["volume_id"], "store_id": pulled["store_id"]} == identity
    assert BitMap.deserialize(pulled["graft"]) == BitMap([0, 1])

    r = post(client, "/v1/volumes/v/read", {"lsn": 1, "pages": BitMap([0, 1]).serialize()})
    answer = msgpack.unpackb(r.content)
    assert answer["lsn"] == 1
    dctx = zstandard.ZstdDecompressor()
    assert [(p, v, dctx.decompress(frame)) for p, v, _, frame in answer["pages"]] == [
        (0, 1, page(1)),
        (1, 1, page(2)),
    ]

    log = msgpack.unpackb(client.get("/v1/volumes/v/log/1").content)
    expected_hash = commit_hash("v", 0, 2, [(0, page(1)), (1, page(2))])
    assert log == {"lsn": 1, "page_count": 2, "hash": expected_hash}


def test_segment_upload_then_commit_by_id(client: TestClient) -> None:
    data = encode_segment([(0, page(3))])[0]
    r = client.post(
        "/v1/segments", content=data, headers={"content-type": "application/octet-stream"}
    )
    sid = msgpack.unpackb(r.content)["sid"]
    body = commit_body("v", 0, 1, {0: page(3)})
    del body["segment"]
    body["segments"] = [sid]
    assert msgpack.unpackb(post(client, "/v1/volumes/v/commit", body).content)["lsn"] == 1
    r = client.post("/v1/segments", content=b"GRFTSEG2 but not really")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_conflict_and_idempotent_retry(client: TestClient) -> None:
    first = commit_body("v", 0, 1, {0: page(1)})
    assert post(client, "/v1/volumes/v/commit", first).status_code == 200
    assert msgpack.unpackb(post(client, "/v1/volumes/v/commit", first).content)["lsn"] == 1
    r = post(client, "/v1/volumes/v/commit", commit_body("v", 0, 1, {0: page(2)}))
    assert r.status_code == 409
    assert r.json()["error"] == "conflict" and r.json()["latest_lsn"] == 1


@pytest.mark.parametrize(
    "method, path, body, status, error",
    [
        ("GET", "/v1/volumes/nope", None, 404, "volume_not_found"),
        ("GET", "/v1/volumes/-bad", None, 400, "invalid_volume_id"),
        ("GET", "/v1/volumes/a..b", None, 400, "invalid_volume_id"),
        ("POST", "/v1/volumes/a%20b/pull", {"since": 0}, 400, "invalid_volume_id"),
        ("POST", "/v1/volumes/a%2Fb/pull", {"since": 0}, 404, "not_found"),  # no such route
        ("POST", "/v1/volumes/v/pull", {"since": 5}, 404, "snapshot_not_found"),
        ("POST", "/v1/volumes/v/pull", {}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/pull", {"since": -1}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/pull", {"since": True}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/pull", [0], 400, "invalid_request"),
        ("POST", "/v1/volumes/v/read", {"lsn": 1, "pages": b"junk"}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/read", {"lsn": 1, "pages": "x"}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/read", {"lsn": 9, "pages": b""}, 404, "snapshot_not_found"),
        ("POST", "/v1/volumes/v/read", {"lsn": 1, "pages": GRAFT_1}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/read", {"lsn": 1, "pages": GRAFT_4097}, 400, "invalid_request"),
        ("POST", "/v1/volumes/v/commit", {"base": 1, "page_count": 1}, 400, "invalid_request"),
        ("GET", "/v1/volumes/v/log/x", None, 400, "invalid_request"),
        ("GET", "/v1/volumes/v/log/0", None, 404, "snapshot_not_found"),
        ("GET", "/v1/volumes/v/log/2", None, 404, "snapshot_not_found"),
        ("GET", "/v1/nothing", None, 404, "not_found"),
        ("PUT", "/v1/volumes/v", None, 405, "method_not_allowed"),
        ("DELETE", "/v1/volumes/none", None, 404, "volume_not_found"),
    ],
)
def test_error_mapping(
    client: TestClient, method: str, path: str, body: object, status: int, error: str
) -> None:
    post(client, "/v1/volumes/v/commit", commit_body("v", 0, 1, {0: page(1)}))
    content = None if body is None else msgpack.packb(body)
    r = client.request(method, path, content=content, headers=MSGPACK)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert r.json()["message"]


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x81\xa5since", b"\x91\x00extra", b"\x81\x90\x00"])
def test_malformed_msgpack_is_a_400(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/volumes/v/pull", content=raw, headers=MSGPACK)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert client.get("/v1/health").status_code == 200


def test_body_limit(client: TestClient, store: MemoryStore) -> None:
    big = b"\x00" * (256 * 1024 + 1)
    r = client.post("/v1/segments", content=big)
    assert (r.status_code, r.json()["error"]) == (413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(300):
            yield b"\x00" * 1024

    r = client.post("/v1/segments", content=chunks())
    assert (r.status_code, r.json()["error"]) == (413, "too_large")
    assert store.list("") == []


def test_corrupt_data_is_a_500_never_data(client: TestClient, store: MemoryStore) -> None:
    post(client, "/v1/volumes/v/commit", commit_body("v", 0, 1, {0: page(1)}))
    (key,) = store.list("segments/")
    data = store.get(key)
    assert data is not None
    store.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    r = post(client, "/v1/volumes/v/read", {"lsn": 1, "pages": BitMap([0]).serialize()})
    assert (r.status_code, r.json()["error"]) == (500, "corrupt_data")


def test_storage_failure_is_a_503() -> None:
    class BrokenStore(MemoryStore):
        def get(self, key: str) -> bytes | None:
            raise StorageError("disk on fire")

        def list(self, prefix: str) -> list[str]:
            raise StorageError("disk on fire")

    with TestClient(create_app(BrokenStore())) as client:
        r = client.get("/v1/volumes/v")
    assert (r.status_code, r.json()["error"]) == (503, "storage_error")


# --- fuzz: hostile bodies never cause a 500 nor change the store -----------------------

SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
ANY_VALUE = st.recursive(
    SCALARS | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
_SEGMENT = encode_segment([(1, page(2))])[0]
BAD_SEGMENTS = [
    encode_segment([(5, page(2))])[0],  # beyond the page count
    encode_segment([(0, page(2))])[0],  # grows the volume without writing page 1
    _SEGMENT[:-1] + bytes([_SEGMENT[-1] ^ 1]),  # a page fails its checksum
    _SEGMENT[:-100],  # truncated
]
# Values that are wrong for an LSN or a page count whatever the volume's state.
BAD_NUMBER = ANY_VALUE.filter(lambda v: not (type(v) is int and 0 <= v < 2**63))
# The volume used below is at LSN 1 with 1 page; a valid commit must grow it to 2.
BODIES = {
    "pull": {"since": BAD_NUMBER},
    "read": {
        "lsn": BAD_NUMBER,
        # Non-empty bytes that are not a graft of existing pages (random bytes never are).
        "pages": st.binary(min_size=2)
        | ANY_VALUE.filter(lambda v: not (isinstance(v, bytes) and len(v) < 2)),
    },
    "commit": {
        "base": BAD_NUMBER | st.integers(2, 2**63 - 1) | st.just(0),
        "page_count": BAD_NUMBER | st.just(1) | st.integers(3, 2**31),
        "hash": ANY_VALUE.filter(lambda v: not (isinstance(v, bytes) and len(v) == 32)),
        "segment": st.sampled_from(BAD_SEGMENTS) | ANY_VALUE.filter(lambda v: v is not None),
        "segments": ANY_VALUE.filter(lambda v: v is not None and v != []),
    },
}


def valid_body(endpoint: str) -> dict[str, Any]:
    if endpoint == "pull":
        return {"since": 0}
    if endpoint == "read":
        return {"lsn": 1, "pages": BitMap([0]).serialize()}
    return commit_body("v", 1, 2, {1: page(2)})


@st.composite
def hostile_request(draw: st.DrawFn) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from(sorted(BODIES)))
    # Mostly one bad field in an otherwise valid body: those reach the deepest code.
    kind = draw(st.sampled_from(["raw", "not a map", "drop", "replace", "replace", "replace"]))
    if kind == "raw":
        return endpoint, draw(st.binary(max_size=64))
    if kind == "not a map":
        return endpoint, msgpack.packb(draw(ANY_VALUE.filter(lambda v: not isinstance(v, dict))))
    body = valid_body(endpoint)
    name = draw(st.sampled_from(sorted(BODIES[endpoint])))
    if kind == "drop" and name in body:  # without "segment", the commit breaks the growth rule
        del body[name]
    else:
        body[name] = draw(BODIES[endpoint][name])
    return endpoint, msgpack.packb(body)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=hostile_request())
def test_fuzz_hostile_bodies_get_4xx_and_change_nothing(
    client: TestClient, store: MemoryStore, request: tuple[str, bytes]
) -> None:
    if not store.list(""):
        post(client, "/v1/volumes/v/commit", commit_body("v", 0, 1, {0: page(1)}))
    before = snapshot_of(store)
    endpoint, raw = request
    r = client.post(f"/v1/volumes/v/{endpoint}", content=raw, headers=MSGPACK)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]
    assert snapshot_of(store) == before



MAX_LSN = (1 << 63) - 1
GOOD_COMMIT = {"base": 0, "page_count": 1, "hash": bytes(32)}
NO_PAGES = {"lsn": 1, "pages": b""}
NOT_16 = "must be 16 bytes, got a "
TOO_MANY_PAGES = "4097 pages requested, at most 4096 per read"
PAGE_COUNT_OVER = ("page_count", (1 << 31) - 1, 1 << 31)


def in_range(name: str, maximum: int, got: object) -> str:
    return f"{name} must be an integer in [0, {maximum}], got {got}"


@pytest.mark.parametrize(
    "method, path, body, message",
    [
        ("POST", "pull", {"since": True}, in_range("since", MAX_LSN, "a bool")),
        ("POST", "read", {**NO_PAGES, "lsn": -1}, in_range("lsn", MAX_LSN, -1)),
        ("POST", "read", {**NO_PAGES, "expand": 1025}, in_range("expand", 1024, 1025)),
        ("POST", "read", {**NO_PAGES, "pages": GRAFT_4097}, TOO_MANY_PAGES),
        ("POST", "read", {**NO_PAGES, "volume_id": bytes(16)}, f"store_id {NOT_16}NoneType"),
        ("POST", "commit", {**GOOD_COMMIT, "base": "0"}, in_range("base", MAX_LSN - 1, "a str")),
        ("POST", "commit", {**GOOD_COMMIT, "page_count": 1 << 31}, in_range(*PAGE_COUNT_OVER)),
        ("POST", "commit", {**GOOD_COMMIT, "hash": b"short"}, "hash must be 32 bytes, got a bytes"),
        ("POST", "commit", {**GOOD_COMMIT, "segment": "x"}, "segment must be binary, got a str"),
        ("POST", "commit", {**GOOD_COMMIT, "segments": 7}, "segments must be a list of ids, got 7"),
        ("POST", "commit", {**GOOD_COMMIT, "segments": ["0" * 32] * 2}, "a segment is named twice"),
        ("GET", "log/" + "9" * 20, None, in_range("lsn", MAX_LSN, "9" * 20)),
    ],
)
def test_malformed_fields_are_refused_at_the_edge_with_their_message(
    client: TestClient, store: MemoryStore, method: str, path: str, body: object, message: str
) -> None:
    """A client reads what is wrong with its request: each field's 400 names it."""
    post(client, "/v1/volumes/v/commit", commit_body("v", 0, 1, {0: page(1)}))
    before = snapshot_of(store)
    content = None if body is None else msgpack.packb(body)
    r = client.request(method, f"/v1/volumes/v/{path}", content=content, headers=MSGPACK)
    assert (r.status_code, r.json()) == (400, {"error": "invalid_request", "message": message})
    assert snapshot_of(store) == before
