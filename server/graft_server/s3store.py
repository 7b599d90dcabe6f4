"""S3Store: the ObjectStore protocol on S3 or any S3-compatible service, through boto3.

The create-only primitive is a PUT with ``If-None-Match: *``: the service answers
412 PreconditionFailed when the key exists, and exactly one of any number of
concurrent creators wins. That is what lets any number of stateless servers share
one bucket. Transient failures (5xx, throttling, timeouts, dropped connections)
are retried by botocore's own bounded retry policy; a 412 is an answer, never
retried. botocore errors become ``StorageError`` here; a missing key is not an
error. Every HTTP request (each attempt, each list page) is counted in ``stats``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from graft_server.objstore import validate_key
from graft_vfs.core.errors import InvalidRequest, StorageError

DEFAULT_REGION = "us-east-1"
MAX_ATTEMPTS = 4  # requests per call at most; botocore "standard" mode backs off with jitter
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0  # per socket read; a call gives up well within a client's 30 s timeout
MAX_POOL_CONNECTIONS = 32  # the server calls the store from uvicorn's thread pool

_MISSING_KEY = ("NoSuchKey", "404", "NotFound")
_KEY_EXISTS = "PreconditionFailed"  # 412: If-None-Match: * found the key
# 409: AWS S3 refuses a conditional write racing another one on the same key that is
# still in flight. That write may yet fail, so this is no verdict: ask again (AWS's
# advice) until the key exists (412) or our write lands.
_CONCURRENT_CONDITIONAL = "ConditionalRequestConflict"
CONFLICT_RETRIES = 5
_RANGE_PAST_END = "InvalidRange"  # 416: the range starts at or after the object's end

# One counter per HTTP request, whatever the retries: operation -> stats key.
_COUNTED = {
    "GetObject": "gets",
    "PutObject": "puts",
    "ListObjectsV2": "lists",
    "DeleteObject": "deletes",
}


_SESSION_LOCK = threading.Lock()  # boto3 sessions are not thread-safe; clients are
_session: boto3.session.Session | None = None


def _shared_session() -> boto3.session.Session:
    """One boto3 session per process: it caches the service model, so that each
    further client costs milliseconds instead of a fifth of a second."""
    global _session
    if _session is None:
        _session = boto3.session.Session()
    return _session


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _retried(exc: ClientError) -> bool:
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0) > 0


class S3Store:
    """Objects under ``prefix/`` in one S3 bucket.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles; resolved once per process)
    unless given; the region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` (default
    us-east-1). With an ``endpoint_url`` (MinIO, R2, Tigris, SeaweedFS, ...)
    requests use path-style addressing and checksums only where the API requires
    them, which S3-compatible services accept. Each call makes at most
    ``max_attempts`` requests (transient failures only are retried, with backoff),
    each bounded by ``connect_timeout`` and ``read_timeout`` seconds.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if not bucket or "/" in bucket:
            raise InvalidRequest(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or None
        self.stats = {"gets": 0, "range_gets": 0, "puts": 0, "lists": 0, "deletes": 0}
        self._stats_lock = threading.Lock()
        self._root = f"{prefix}/" if prefix else ""
        region = (
            region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        )
        options: dict[str, Any] = {
            # botocore's "max_attempts" counts retries; "total_max_attempts" counts requests.
            "retries": {"total_max_attempts": max_attempts, "mode": "standard"},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_pool_connections": MAX_POOL_CONNECTIONS,
        }
        if self.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
            # botocore >= 1.36 adds CRC checksums to every upload by default, which
            # several S3-compatible services reject; segments carry their own checksums.
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        self._credentials = (access_key_id, secret_access_key)
        with self._s3_errors("connection setup", bucket), _SESSION_LOCK:
            session = _shared_session()
            self.region = region or session.region_name or DEFAULT_REGION
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(**options),
            )
        self._client.meta.events.register("request-created.s3", self._count_request)

    def presigner(self, endpoint_url: str | None = None) -> Callable[[str, int], str]:
        """A function ``(key, seconds) -> URL``: a presigned GET of one object, SigV4.

        The URL lets whoever holds it GET (any byte range of) that one object until it
        expires, and nothing else: no other key, no other method. It is signed for
        ``endpoint_url`` (default: the store's own endpoint), since the signature covers
        the Host header: give the address clients reach the store at. Signing is local
        (HMACs over the request): it costs no request to the store.
        """
        endpoint = endpoint_url or self.endpoint_url
        options: dict[str, Any] = {"signature_version": "s3v4"}
        if endpoint:
            options["s3"] = {"addressing_style": "path"}
        access_key_id, secret_access_key = self._credentials
        with self._s3_errors("signer setup", self.bucket), _SESSION_LOCK:
            client = _shared_session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=self.region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(**options),
            )

        def sign(key: str, seconds: int) -> str:
            with self._s3_errors("presign", key):
                url: str = client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self._key(key)},
                    ExpiresIn=seconds,
                )
            return url

        return sign

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store({self.bucket!r}, {self.prefix!r}{where})"

    def _count_request(self, request: Any, operation_name: str, **_: Any) -> None:
        name = _COUNTED.get(operation_name)
        if name == "gets" and "Range" in request.headers:
            name = "range_gets"
        if name is not None:
            with self._stats_lock:
                self.stats[name] += 1

    def _key(self, key: str) -> str:
        return self._root + validate_key(key)

    @contextmanager
    def _s3_errors(self, op: str, key: str) -> Iterator[None]:
        """The one boundary where botocore errors become StorageError."""
        try:
            yield
        except ClientError as exc:
            code, status = _error_code(exc), _http_status(exc)
            raise StorageError(
                f"S3 {op} of {key!r} in bucket {self.bucket!r} failed: {code or status} {exc}"
            ) from exc
        except BotoCoreError as exc:  # no credentials, endpoint unreachable, timeouts
            raise StorageError(
                f"S3 {op} of {key!r} in bucket {self.bucket!r} failed: {exc}"
            ) from exc

    def get(self, key: str) -> bytes | None:
        full = self._key(key)
        with self._s3_errors("get", key):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if _error_code(exc) in _MISSING_KEY:
                    return None
                raise
            return bytes(response["Body"].read())

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        full = self._key(key)
        if start < 0 or length < 0:
            raise InvalidRequest(f"invalid byte range start={start} length={length}")
        # A zero-length range cannot be expressed; one byte answers "missing or not".
        end = start + max(length, 1) - 1
        with self._s3_errors("ranged get", key):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end}"
                )
            except ClientError as exc:
                code = _error_code(exc)
                if code in _MISSING_KEY:
                    return None
                if code == _RANGE_PAST_END:
                    return b""
                raise
            data = bytes(response["Body"].read())
        if "ContentRange" not in response:  # a 200 with the whole object: range ignored
            data = data[start:]
        return data[:length]

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        with self._s3_errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        data = bytes(data)
        with self._s3_errors("create", key):
            for attempt in range(CONFLICT_RETRIES + 1):
                try:
                    self._client.put_object(
                        Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*"
                    )
                except ClientError as exc:
                    code = _error_code(exc)
                    if code == _CONCURRENT_CONDITIONAL and attempt < CONFLICT_RETRIES:
                        time.sleep(0.05 * 2**attempt)
                        continue
                    if code != _KEY_EXISTS:
                        raise  # a 409 that outlasted the retries is a StorageError (503)
                    # After a retried attempt, the key may exist because an earlier
                    # attempt of ours landed and only its answer was lost: then the
                    # object holds exactly our bytes, and this create succeeded.
                    return _retried(exc) and self.get(key) == data
                return True
            raise AssertionError("unreachable")

    def list(self, prefix: str, start_after: str | None = None) -> list[str]:
        if prefix:
            validate_key(prefix.removesuffix("/"))
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._root + prefix}
        if start_after is not None and start_after > prefix:
            # Only a lower bound for the service: SeaweedFS, for one, lists in
            # directory-tree order and skips a "directory" named by StartAfter, so
            # the exact filter and the order are applied here. Where graft uses
            # start_after (a key among the leaf keys of one log), every store agrees.
            params["StartAfter"] = self._root + start_after
        keys: list[str] = []
        with self._s3_errors("list", prefix):
            while True:
                page = self._client.list_objects_v2(**params)
                keys.extend(obj["Key"][len(self._root) :] for obj in page.get("Contents", ()))
                if not page.get("IsTruncated"):
                    break
                params["ContinuationToken"] = page["NextContinuationToken"]
        if start_after is not None:
            keys = [k for k in keys if k > start_after]
        return sorted(keys)

    def delete(self, key: str) -> None:
        full = self._key(key)
        with self._s3_errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def check(self) -> None:
        """One listing request of at most one key: the bucket exists, the service
        answers, and the credentials may list (which reads of missing keys need)."""
        try:
            with self._s3_errors("listing", self._root or "/"):
                self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._root, MaxKeys=1)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _error_code(cause) == "NoSuchBucket":
                where = f" at {self.endpoint_url}" if self.endpoint_url else ""
                raise StorageError(
                    f"S3 bucket {self.bucket!r} does not exist{where}: create it, "
                    "or fix --store (and --s3-endpoint)"
                ) from None
            raise
