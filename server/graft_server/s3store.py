"""S3Store: the ObjectStore protocol on S3 or any S3-compatible service, through boto3.

The create-only primitive is a PUT with ``If-None-Match: *``: the service answers
412 PreconditionFailed when the key exists, and exactly one of any number of
concurrent creators wins. That is what lets any number of stateless servers share
one bucket. Transient failures (5xx, throttling, timeouts, dropped connections)
are retried by botocore's own bounded retry policy; a 412 is an answer, never
retried. botocore errors become ``StorageError`` here (a ``StoreFailure`` that says its
kind: timeout, unavailable, server_error, ...); a missing key is not an error. Every
HTTP request (each attempt, each list page) is counted in ``stats``.

Reads are the hot path of a cold server (one GET per run of frames a client misses),
and a boto3 call costs about 2 ms of CPU on top of the request itself: its event
hooks, request model and response parser. So, on a store with an ``endpoint_url``,
``get`` and ``get_range`` send a plain GET through urllib3 (the HTTP library boto3
itself uses), signed by botocore's own SigV4 signer, with the same bounded retries,
timeouts, counting and error mapping: about 0.8 ms of CPU each (measured on
SeaweedFS, loopback). Writes, lists and deletes, and reads from AWS itself, stay on
boto3.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import boto3
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from graft_server.objstore import StoreFailure, validate_key
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
# Answers a fast read retries, as botocore's standard mode does: throttling and 5xx.
_RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_BASE_DELAY = 0.05  # seconds; doubled per attempt, with full jitter, at most 1 s
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")

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


def _status_kind(status: int | None) -> str:
    """The kind of failure (objstore.ERROR_KINDS) an HTTP status of S3 means."""
    if status is None:
        return "other"
    if status in _RETRIED_STATUS or status >= 500:
        return "server_error"
    return "denied" if status in (401, 403) else "rejected"


def _botocore_kind(exc: BotoCoreError) -> str:
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return "timeout"
    if isinstance(exc, BotoConnectionError):
        return "unavailable"
    return "denied" if isinstance(exc, NoCredentialsError) else "other"


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
    each bounded by ``connect_timeout`` and ``read_timeout`` seconds. ``fast_reads``
    (default on; it applies with an ``endpoint_url``) sends reads outside boto3 (see
    the module's docstring); off, every request goes through boto3.
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
        fast_reads: bool = True,
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
        self._max_attempts = max(1, max_attempts)
        self._fast: _FastReads | None = None
        if self.endpoint_url and fast_reads:
            with _SESSION_LOCK:
                credentials = (
                    Credentials(access_key_id, secret_access_key)
                    if access_key_id and secret_access_key
                    else _shared_session().get_credentials()
                )
            if credentials is not None:  # none at all: boto3 says so on the first call
                self._fast = _FastReads(credentials, self.region, connect_timeout, read_timeout)

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
            raise StoreFailure(
                f"S3 {op} of {key!r} in bucket {self.bucket!r} failed: {code or status} {exc}",
                "server_error" if code in ("SlowDown", "Throttling") else _status_kind(status),
            ) from exc
        except BotoCoreError as exc:  # no credentials, endpoint unreachable, timeouts
            raise StoreFailure(
                f"S3 {op} of {key!r} in bucket {self.bucket!r} failed: {exc}",
                _botocore_kind(exc),
            ) from exc

    def get(self, key: str) -> bytes | None:
        full = self._key(key)
        if self._fast is not None:
            got = self._fast_get("get", key, full, None)
            return got if got is None else got[0]
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
        if self._fast is not None:
            got = self._fast_get("ranged get", key, full, f"bytes={start}-{end}")
            if got is None:
                return None
            data, ranged = got
            return (data if ranged else data[start:])[:length]
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

    def _fast_get(
        self, op: str, key: str, full: str, byte_range: str | None
    ) -> tuple[bytes, bool] | None:
        """One GET of ``full`` outside boto3: (body, whether the range was applied), or
        None for a missing key; b"" for a range past the end. Retries as boto3 would."""
        assert self._fast is not None and self.endpoint_url is not None
        url = f"{self.endpoint_url.rstrip('/')}/{quote(self.bucket)}/{quote(full, safe='/~')}"
        stat = "gets" if byte_range is None else "range_gets"
        failure, kind = "", "other"
        for attempt in range(self._max_attempts):
            if attempt:
                time.sleep(random.uniform(0, min(1.0, RETRY_BASE_DELAY * 2**attempt)))
            with self._stats_lock:
                self.stats[stat] += 1
            try:
                response = self._fast.get(url, byte_range)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
                # (urllib3's NewConnectionError, a refused connection, is a timeout
                # error by inheritance only.)
                timeout = (urllib3.exceptions.TimeoutError, TimeoutError)
                refused = isinstance(exc, urllib3.exceptions.NewConnectionError)
                kind = "timeout" if isinstance(exc, timeout) and not refused else "unavailable"
                continue
            status, body = response.status, response.data
            if status in (200, 206):
                return bytes(body), status == 206
            match = _ERROR_CODE.search(body[:4096])
            code = match.group(1).decode("ascii", "replace") if match else ""
            if status == 404 and code in ("NoSuchKey", ""):
                return None
            if status == 416:
                return b"", True
            failure, kind = f"{code or status} (HTTP {status})", _status_kind(status)
            if status not in _RETRIED_STATUS:
                break
        raise StoreFailure(f"S3 {op} of {key!r} in bucket {self.bucket!r} failed: {failure}", kind)

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


class _FastReads:
    """Signed GETs through one urllib3 connection pool (see the module's docstring).

    The pool holds as many connections as the boto3 client's, and never blocks: the
    server's reader threads (``segments.PARALLEL_READS`` per request) each get one.
    """

    def __init__(
        self, credentials: Any, region: str, connect_timeout: float, read_timeout: float
    ) -> None:
        self.credentials = credentials
        self.region = region
        self.pool = urllib3.PoolManager(
            maxsize=MAX_POOL_CONNECTIONS,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )

    def get(self, url: str, byte_range: str | None) -> urllib3.BaseHTTPResponse:
        headers = {"Range": byte_range} if byte_range is not None else {}
        request = AWSRequest("GET", url, headers=headers)
        # Refreshable credentials (instance roles) can change between reads of their
        # parts: sign with one consistent copy, as botocore does.
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        return self.pool.request("GET", url, headers=dict(request.headers.items()), redirect=False)
