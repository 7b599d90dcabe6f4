"""S3Store specifics: error mapping, bounded retries, and the answers of a conditional PUT.

The ObjectStore contract itself runs on S3Store in test_server_objstore.py, against a
real SeaweedFS; here are the cases a healthy server does not produce on demand.
"""

from __future__ import annotations

import socket

import pytest
from botocore.stub import Stubber

from graft_server.s3store import S3Store
from graft_vfs.core.errors import StorageError

# Bound for the module's life and never listened on: connections to it are refused, and
# no other process can take the port meanwhile.
_UNLISTENED: list[socket.socket] = []


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _UNLISTENED.append(s)
    return s.getsockname()[1]


def offline_store(max_attempts: int = 2) -> S3Store:
    return S3Store(
        "bucket",
        "prefix",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        access_key_id="id",
        secret_access_key="secret",
        max_attempts=max_attempts,
        connect_timeout=1.0,
    )


def test_unreachable_endpoint_is_retried_then_a_storage_error() -> None:
    store = offline_store(max_attempts=2)
    with pytest.raises(StorageError, match="S3 get of 'k' in bucket 'bucket' failed"):
        store.get("k")
    assert store.stats["gets"] == 2  # one count per HTTP attempt: retried, and bounded
    with pytest.raises(StorageError):
        store.put_if_absent("k", b"x")
    with pytest.raises(StorageError):
        store.list("")


@pytest.mark.stores("s3")
def test_missing_bucket_is_an_error_not_a_missing_key(seaweed) -> None:
    store = S3Store(
        seaweed.bucket + "-missing",
        endpoint_url=seaweed.endpoint,
        access_key_id="graft-test",
        secret_access_key="graft-test-secret",
    )
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.get("k")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.list("")


@pytest.mark.stores("s3")
def test_keys_live_under_the_prefix(seaweed) -> None:
    store = seaweed.store("a/deep/prefix")
    store.put("volumes/v/log/1", b"x")
    listed = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix="a/deep/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/deep/prefix/volumes/v/log/1"]
    assert store.list("") == ["volumes/v/log/1"]
    assert seaweed.store("a/deep").list("") == ["prefix/volumes/v/log/1"]


def stubbed(store: S3Store) -> Stubber:
    return Stubber(store._client)


def test_precondition_failed_after_a_retry_is_a_win_if_the_bytes_are_ours() -> None:
    # An attempt landed but its answer was lost; the retry then found the key taken.
    store = offline_store()
    with stubbed(store) as stub:
        retried = {"RetryAttempts": 1}
        stub.add_client_error("put_object", "PreconditionFailed", 412, response_meta=retried)
        stub.add_response("get_object", {"Body": _body(b"ours")})
        assert store.put_if_absent("log/1", b"ours") is True
        stub.add_client_error("put_object", "PreconditionFailed", 412, response_meta=retried)
        stub.add_response("get_object", {"Body": _body(b"theirs")})
        assert store.put_if_absent("log/1", b"ours") is False
        stub.add_client_error("put_object", "PreconditionFailed", 412)  # first attempt
        assert store.put_if_absent("log/1", b"ours") is False  # no second look needed
        stub.assert_no_pending_responses()


def test_conditional_request_conflict_is_asked_again_until_a_verdict() -> None:
    store = offline_store()
    with stubbed(store) as stub:
        # the racing write landed: ours then finds the key (412), a lost race
        stub.add_client_error("put_object", "ConditionalRequestConflict", 409)
        stub.add_client_error("put_object", "PreconditionFailed", 412)
        assert store.put_if_absent("log/1", b"x") is False
        # the racing write failed: ours lands on the next try
        stub.add_client_error("put_object", "ConditionalRequestConflict", 409)
        stub.add_response("put_object", {})
        assert store.put_if_absent("log/1", b"x") is True
        for _ in range(6):  # no verdict at all: a storage error, never a conflict
            stub.add_client_error("put_object", "ConditionalRequestConflict", 409)
        with pytest.raises(StorageError):
            store.put_if_absent("log/1", b"x")
        stub.add_client_error("put_object", "AccessDenied", 403)
        with pytest.raises(StorageError, match="AccessDenied"):
            store.put_if_absent("log/1", b"x")


def test_range_past_the_end_is_empty_and_a_missing_key_is_none() -> None:
    store = offline_store()
    with stubbed(store) as stub:
        stub.add_client_error("get_object", "InvalidRange", 416)
        assert store.get_range("k", 100, 10) == b""
        stub.add_client_error("get_object", "NoSuchKey", 404)
        assert store.get_range("k", 0, 10) is None
        stub.add_response("get_object", {"Body": _body(b"0123456789")})  # Range ignored: 200
        assert store.get_range("k", 2, 3) == b"234"


def _body(data: bytes):
    import io

    from botocore.response import StreamingBody

    return StreamingBody(io.BytesIO(data), len(data))
