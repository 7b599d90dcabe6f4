"""S3Store specifics: error mapping, bounded retries, and the answers of a conditional PUT.

The ObjectStore contract itself runs on S3Store in test_server_objstore.py, against a
real SeaweedFS; here are the cases a healthy server does not produce on demand.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from botocore.stub import Stubber

from graft_server.s3store import S3Store
from graft_vfs.core.errors import StorageError
from support.s3 import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFS

# Bound for the module's life and never listened on: connections to it are refused, and
# no other process can take the port meanwhile.
_UNLISTENED: list[socket.socket] = []


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _UNLISTENED.append(s)
    return s.getsockname()[1]


def offline_store(max_attempts: int = 2, *, fast_reads: bool = True) -> S3Store:
    return S3Store(
        "bucket",
        "prefix",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        access_key_id="id",
        secret_access_key="secret",
        max_attempts=max_attempts,
        connect_timeout=1.0,
        fast_reads=fast_reads,
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
    """Canned boto3 answers: only for a store whose reads go through boto3 too."""
    assert store._fast is None
    return Stubber(store._client)


def test_precondition_failed_after_a_retry_is_a_win_if_the_bytes_are_ours() -> None:
    # An attempt landed but its answer was lost; the retry then found the key taken.
    store = offline_store(fast_reads=False)
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
    store = offline_store(fast_reads=False)
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
    store = offline_store(fast_reads=False)
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


# -- reads outside boto3 (S3Store's fast reads) ---------------------------------------


def test_fast_reads_are_signed_and_answer_as_boto3_does(signed_seaweed: SeaweedFS) -> None:
    store = signed_seaweed.store()
    assert store._fast is not None
    data = bytes(range(256)) * 40
    store.put("dir/obj", data)
    assert store.get("dir/obj") == data
    assert store.get_range("dir/obj", 1000, 300) == data[1000:1300]
    assert store.get_range("dir/obj", len(data) - 5, 100) == data[-5:]  # clipped at the end
    assert store.get_range("dir/obj", len(data) + 5, 10) == b""  # past the end
    assert store.get("dir/missing") is None
    assert store.get_range("dir/missing", 0, 10) is None
    assert (store.stats["gets"], store.stats["range_gets"]) == (2, 4)
    slow = S3Store(
        signed_seaweed.bucket,
        store.prefix,
        endpoint_url=signed_seaweed.endpoint,
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
        fast_reads=False,
    )
    assert slow.get("dir/obj") == data and slow.get_range("dir/obj", 7, 9) == data[7:16]


def test_fast_reads_with_a_wrong_secret_are_refused(signed_seaweed: SeaweedFS) -> None:
    store = signed_seaweed.store()
    store.put("k", b"secret bytes")
    forged = S3Store(
        signed_seaweed.bucket,
        store.prefix,
        endpoint_url=signed_seaweed.endpoint,
        access_key_id=ACCESS_KEY_ID,
        secret_access_key="not-the-secret",
    )
    assert forged._fast is not None
    with pytest.raises(StorageError, match=r"S3 get of 'k' .*HTTP 403"):
        forged.get("k")
    with pytest.raises(StorageError, match="HTTP 403"):
        forged.get_range("k", 0, 4)
    assert forged.stats["gets"] == 1  # a refusal is an answer: not retried


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers GETs from the class's ``answers`` list: (status, body), first one first."""

    answers: list[tuple[int, bytes]] = []
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(dict(self.headers.items()))
        status, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[tuple[S3Store, type[_Canned]]]:
    """An S3Store on a local HTTP server whose answers a test sets."""
    handler = type("Handler", (_Canned,), {"answers": [], "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    store = S3Store(
        "bucket",
        "prefix",
        endpoint_url=f"http://127.0.0.1:{httpd.server_address[1]}",
        access_key_id="id",
        secret_access_key="secret",
        max_attempts=3,
    )
    yield store, handler
    httpd.shutdown()
    httpd.server_close()


def _error(code: str) -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode()


def test_fast_reads_retry_throttling_and_5xx_a_bounded_number_of_times(canned) -> None:
    store, handler = canned
    handler.answers += [(503, _error("SlowDown")), (500, b""), (206, b"abc")]
    assert store.get_range("k", 10, 3) == b"abc"
    assert store.stats["range_gets"] == 3
    assert handler.seen[0]["Range"] == "bytes=10-12"
    assert handler.seen[0]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=id/")
    handler.answers += [(503, _error("SlowDown"))] * 3
    with pytest.raises(StorageError, match="SlowDown"):
        store.get("k")
    assert store.stats["gets"] == 3  # max_attempts, then the error


def test_fast_reads_tell_a_missing_bucket_from_a_missing_key(canned) -> None:
    store, handler = canned
    handler.answers += [(404, _error("NoSuchKey")), (404, _error("NoSuchBucket"))]
    assert store.get("k") is None
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.get("k")
    handler.answers += [(200, b"0123456789")]  # a service that ignored the Range header
    assert store.get_range("k", 2, 3) == b"234"
    handler.answers += [(416, _error("InvalidRange"))]
    assert store.get_range("k", 100, 3) == b""
