"""The HTTP edge of the server: the routes of docs/protocol.md and their input checks.

Routes parse msgpack bodies into checked, typed values (the field parsers below: every
400 for a malformed field is raised here), call the volume services (in a worker
thread: all storage work blocks), and encode the answer. Errors become the protocol's
JSON error bodies in one place, ``error_response``, through the protocol's one table
(``graft_vfs.core.protocol``); storage logic lives in the index, commits, reads and
segments modules.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, NamedTuple

import msgpack
from pyroaring import BitMap
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from graft_server.auth import READ, WRITE, TokenFile, authorize
from graft_server.deletion import delete
from graft_server.direct import DirectReads
from graft_server.history import MAX_LOG_ENTRIES, Commit
from graft_server.limits import (
    DEFAULT_BODY_TIMEOUT,
    MAX_LOADED_VOLUMES,
)
from graft_server.metrics import CountRequests, Metrics
from graft_server.objstore import CountingStore, ObjectStore
from graft_server.reads import MAX_OPENING
from graft_server.segments import SegmentCache, upload_segment
from graft_server.volumes import Volumes
from graft_vfs.core.commit import HASH_SIZE, NONCE_SIZE
from graft_vfs.core.errors import (
    CommitConflict,
    Forbidden,
    GraftError,
    InvalidRequest,
    RequestTimeout,
    TooLarge,
    Unauthorized,
)
from graft_vfs.core.graft import MAX_PAGES, MAX_PAGES_PER_READ, decode_graft
from graft_vfs.core.identity import Identity
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_segment_id
from graft_vfs.core.protocol import MAX_EXPAND, MAX_LOCATE_PAGES, MSGPACK, wire_error
from graft_vfs.core.version import VERSION

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_CACHE = 256 * 1024 * 1024


log = logging.getLogger("graft.server")


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The JSON error body for any exception a route raised."""
    error = wire_error(exc)
    status, code = error.status, error.code
    body: dict[str, Any] = {"error": code, "message": str(exc)}
    headers = None
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code).inc()
    if isinstance(exc, CommitConflict):
        body["latest_lsn"] = exc.latest_lsn
        if metrics is not None:
            metrics.conflicts.inc()
    if isinstance(exc, RequestTimeout):
        # The rest of the body may still be on its way: this connection is done.
        headers = {"Connection": "close"}
    if isinstance(exc, (Unauthorized, Forbidden)):
        # The message names the token, never the token itself nor its hash.
        client = request.client.host if request.client else "?"
        log.warning("denied %s %r from %s: %s", request.method, request.url.path, client, exc)
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": 'Bearer realm="graft"'}
    if status >= 500 and isinstance(exc, GraftError):  # uvicorn logs unexpected errors itself
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse(body, status, headers=headers)


def http_error_response(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return JSONResponse(
        {"error": code, "message": exc.detail}, exc.status_code, headers=exc.headers
    )


def msgpack_response(body: Mapping[str, Any]) -> Response:
    return Response(msgpack.packb(body), media_type=MSGPACK)


async def read_body(request: Request, limit: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> bytes:
    """The request body, refusing more than ``limit`` bytes before buffering them.

    A body that has not arrived in full within ``timeout`` seconds is RequestTimeout
    (uvicorn itself waits for a body forever).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidRequest(f"invalid Content-Length {declared[:40]!r}")
        if int(declared) > limit:
            raise TooLarge(f"body of {declared} bytes is over the limit of {limit}")
    try:
        return await asyncio.wait_for(_receive_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} s; send it at once"
        ) from None


async def _receive_body(request: Request, limit: int) -> bytes:
    # Content-Length may be absent (chunked) or lie: count what actually arrives.
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(data: bytes) -> dict[str, Any]:
    """A msgpack map from untrusted bytes; anything else is InvalidRequest."""
    try:
        body = msgpack.unpackb(data)
    # msgpack signals bad input with many types (ExtraData, FormatError, StackError,
    # ValueError, TypeError for unhashable keys, UnicodeDecodeError...): all are 400s.
    except Exception as exc:
        raise InvalidRequest(f"body is not valid msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest(f"body must be a msgpack map, got {type(body).__name__}")
    return body


def field(body: Mapping[str, Any], name: str) -> Any:
    """A required field of a request body."""
    if name not in body:
        raise InvalidRequest(f"missing field {name!r}")
    return body[name]


def _describe(value: object) -> str:
    # Never echo a client's value whole: it may be megabytes of binary.
    return str(value) if type(value) is int else f"a {type(value).__name__}"


def parse_int(value: object, name: str, maximum: int) -> int:
    """An integer field in ``[0, maximum]``: an LSN, a page count, a budget."""
    # bool is an int subclass, and msgpack turns true into True: refuse it explicitly.
    if type(value) is not int or not 0 <= value <= maximum:
        raise InvalidRequest(f"{name} must be an integer in [0, {maximum}], got {_describe(value)}")
    return value


def _query_int(request: Request, name: str) -> int | str:
    """A query parameter as an integer (0 when absent); a malformed one stays text, for
    ``parse_int`` to refuse with its one-line message."""
    value = request.query_params.get(name, "0")
    return int(value) if value.isdigit() and len(value) <= 12 else value


def parse_bytes(value: object, name: str, size: int) -> bytes:
    """A binary field of exactly ``size`` bytes: a hash, an identity."""
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidRequest(f"{name} must be {size} bytes, got {_describe(value)}")
    return value


def parse_identity(body: Mapping[str, Any]) -> Identity | None:
    """The identity a client expects the volume to have (both fields, or neither)."""
    store_id, volume_id = body.get("store_id"), body.get("volume_id")
    if store_id is None and volume_id is None:
        return None
    return Identity(
        parse_bytes(store_id, "store_id", IDENTITY_SIZE),
        parse_bytes(volume_id, "volume_id", IDENTITY_SIZE),
    )


def parse_pages(value: object) -> BitMap:
    """The pages a read asks for: a graft of at most MAX_PAGES_PER_READ pages."""
    pages = decode_graft(value)
    if len(pages) > MAX_PAGES_PER_READ:
        raise InvalidRequest(f"{len(pages)} pages requested, at most {MAX_PAGES_PER_READ} per read")
    return pages


def parse_locate_pages(value: object) -> BitMap:
    """The pages a locate asks for: a graft of at most MAX_LOCATE_PAGES pages."""
    pages = decode_graft(value)
    if len(pages) > MAX_LOCATE_PAGES:
        raise InvalidRequest(
            f"{len(pages)} pages to locate, at most {MAX_LOCATE_PAGES} per request"
        )
    return pages


def parse_segment(value: object) -> bytes | None:
    """A commit's inline segment, if any; its contents are verified by the commit."""
    if value is not None and not isinstance(value, bytes):
        raise InvalidRequest(f"segment must be binary, got {_describe(value)}")
    return value


def parse_segment_ids(value: object) -> list[str]:
    """The uploaded segments a commit names: valid ids, each once."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"segments must be a list of ids, got {_describe(value)}")
    sids = [validate_segment_id(sid) for sid in value]
    if len(set(sids)) != len(sids):
        raise InvalidRequest("a segment is named twice")
    return sids


class CommitRequest(NamedTuple):
    """The body of a commit, checked field by field."""

    base: int
    page_count: int
    hash: bytes
    segment: bytes | None
    sids: list[str]
    expected: Identity | None
    nonce: bytes


def parse_commit(body: Mapping[str, Any]) -> CommitRequest:
    """The fields of a commit body; what needs the store (hash, segments) is the commit's."""
    return CommitRequest(
        base=parse_int(field(body, "base"), "base", MAX_LSN - 1),  # base + 1 is an LSN too
        page_count=parse_int(field(body, "page_count"), "page_count", MAX_PAGES - 1),
        hash=parse_bytes(field(body, "hash"), "hash", HASH_SIZE),
        segment=parse_segment(body.get("segment")),
        sids=parse_segment_ids(body.get("segments")),
        expected=parse_identity(body),
        nonce=b"" if body.get("nonce") is None else parse_bytes(body["nonce"], "nonce", NONCE_SIZE),
    )


def _commit(commit: Commit) -> dict[str, Any]:
    """A commit of the history routes; ``fork_of`` only on a fork's first."""
    fields = commit._asdict()
    origin = fields.pop("fork_of")
    if origin is not None:
        fields["fork_of"] = {"vid": origin[0], "lsn": origin[1]}
    return fields


def parse_lsn(text: str) -> int:
    """An LSN in a path."""
    # 20 digits hold any u64; the range is checked as for an LSN in a body.
    if not re.fullmatch(r"[0-9]{1,20}", text):
        raise InvalidRequest(f"invalid LSN {text[:40]!r} in path")
    return parse_int(int(text), "lsn", MAX_LSN)


Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(
    store: ObjectStore,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    cache_bytes: int = DEFAULT_CACHE,
    tokens: TokenFile | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_volumes: int = MAX_LOADED_VOLUMES,
    direct: DirectReads | None = None,
) -> Starlette:
    """The ASGI app serving the volumes in ``store``; bodies over ``max_body`` get 413.

    ``cache_bytes`` bounds the in-memory cache of page frames (0 disables it). With
    ``tokens``, every route but health needs a bearer token whose scope covers it
    (401 without a valid one, 403 outside its scope); without, the server is open.
    A body that takes longer than ``body_timeout`` seconds to arrive gets 408; the
    page maps of at most ``max_volumes`` volumes stay in memory. With ``direct``, the
    server offers direct reads (``/locate``: see server/direct.py) and says so in
    health, snapshot and pull answers (``"direct": true``).
    """
    # Every call the app and its GC make goes through this one counter (for /metrics).
    counted = CountingStore(store)
    cache = SegmentCache(cache_bytes) if cache_bytes else None
    volumes = Volumes(counted, cache=cache, max_loaded=max_volumes)
    metrics = Metrics(counted, cache)

    def guarded(access: str, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the token check, made before any of the body is read."""
        if tokens is None:
            return endpoint

        async def checked(request: Request) -> Response:
            token = tokens.authenticate(request.headers.get("authorization"))
            authorize(token, access, request.path_params.get("vid"))
            request.state.token = token
            return await endpoint(request)

        return checked

    async def read_map(request: Request) -> dict[str, Any]:
        return decode_body(await read_body(request, max_body, body_timeout))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "version": VERSION, "direct": direct is not None})

    async def list_volumes(request: Request) -> Response:
        token = getattr(request.state, "token", None)
        # Out-of-scope volumes are never loaded: their state (or damage) is not the
        # caller's business, and loading them would cost time for nothing.
        allowed = None if token is None else functools.partial(token.allows, READ)
        listed = await run_in_threadpool(volumes.reads.list_volumes, allowed)
        return JSONResponse({"volumes": [v._asdict() for v in listed]})

    def identified(vid: str, answer: dict[str, Any]) -> dict[str, Any]:
        """``answer`` with the volume's and the store's identity, for the client to check."""
        identity = volumes.index.identity(vid)
        answer = {**answer, "volume_id": identity.volume_id, "store_id": identity.store_id}
        if direct is not None:
            answer["direct"] = True
        return answer

    async def snapshot(request: Request) -> Response:
        vid = request.path_params["vid"]

        # ?open=N: up to N pages every first query reads come along (Reads.opening).
        budget = parse_int(_query_int(request, "open"), "open", MAX_OPENING)

        def answer() -> dict[str, Any]:
            if not budget:
                return identified(vid, volumes.reads.head(vid)._asdict())
            head, frames = volumes.reads.opening(vid, budget)
            return identified(vid, {**head._asdict(), "pages": [list(f) for f in frames]})

        return msgpack_response(await run_in_threadpool(answer))

    async def pull(request: Request) -> Response:
        vid = request.path_params["vid"]
        body = await read_map(request)
        since = parse_int(field(body, "since"), "since", MAX_LSN)

        def answer() -> dict[str, Any]:
            result = volumes.reads.pull(vid, since)
            fields = {
                "vid": vid,
                "lsn": result.lsn,
                "page_count": result.page_count,
                "graft": result.graft.serialize(),
            }
            return identified(vid, fields)

        return msgpack_response(await run_in_threadpool(answer))

    async def read(request: Request) -> Response:
        body = await read_map(request)
        lsn = parse_int(field(body, "lsn"), "lsn", MAX_LSN)
        pages = parse_pages(field(body, "pages"))
        expand = parse_int(body.get("expand", 0), "expand", MAX_EXPAND)
        expected = parse_identity(body)
        frames = await run_in_threadpool(
            volumes.reads.read, request.path_params["vid"], lsn, pages, expand, expected
        )
        return msgpack_response({"lsn": lsn, "pages": [list(f) for f in frames]})

    async def locate(request: Request) -> Response:
        if direct is None:
            raise InvalidRequest(
                "this server does not offer direct reads (a directory store, or --no-direct): "
                "read pages with /read"
            )
        body = await read_map(request)
        lsn = parse_int(field(body, "lsn"), "lsn", MAX_LSN)
        pages = parse_locate_pages(field(body, "pages"))
        expected = parse_identity(body)
        answer = await run_in_threadpool(
            direct.locate, volumes.reads, request.path_params["vid"], lsn, pages, expected
        )
        return msgpack_response(answer)

    async def upload(request: Request) -> Response:
        data = await read_body(request, max_body, body_timeout)
        sid = await run_in_threadpool(upload_segment, counted, data)
        return msgpack_response({"sid": sid})

    async def commit(request: Request) -> Response:
        vid = request.path_params["vid"]
        checked = parse_commit(await read_map(request))

        def answer() -> dict[str, Any]:
            lsn = volumes.commits.commit(
                vid,
                base=checked.base,
                page_count=checked.page_count,
                hash=checked.hash,
                segment=checked.segment,
                sids=checked.sids,
                expected=checked.expected,
                nonce=checked.nonce,
            )
            metrics.commits.inc()
            # A client that created the volume learns its identity here.
            return identified(vid, {"lsn": lsn})

        return msgpack_response(await run_in_threadpool(answer))

    async def log_entry(request: Request) -> Response:
        lsn = parse_lsn(request.path_params["lsn"])
        entry = await run_in_threadpool(volumes.reads.log_entry, request.path_params["vid"], lsn)
        return msgpack_response(entry._asdict())

    async def history(request: Request) -> Response:
        vid = request.path_params["vid"]
        body = await read_map(request)
        before = parse_int(body.get("before", 0), "before", MAX_LSN)
        limit = parse_int(body.get("limit", 100), "limit", MAX_LOG_ENTRIES)
        commits = await run_in_threadpool(volumes.history.log, vid, before or None, limit)
        return msgpack_response({"vid": vid, "commits": [_commit(c) for c in commits]})

    async def lsn_at(request: Request) -> Response:
        vid = request.path_params["vid"]
        when = field(await read_map(request), "time")
        if type(when) not in (int, float) or not 0 <= when < 1e11:
            raise InvalidRequest(f"time must be seconds since the epoch, got {_describe(when)}")
        commit = await run_in_threadpool(volumes.history.lsn_at, vid, float(when))
        return msgpack_response({"vid": vid, **_commit(commit)})

    async def fork(request: Request) -> Response:
        vid = request.path_params["vid"]
        body = await read_map(request)
        source = field(body, "source")
        if not isinstance(source, str):
            raise InvalidRequest(f"source must be a volume name, got {_describe(source)}")
        token = getattr(request.state, "token", None)
        if token is not None and not token.allows(READ, source):
            raise Forbidden(f"this token may not read {source[:200]!r}, the fork's source")
        lsn = body.get("lsn")
        lsn = None if lsn is None else parse_int(lsn, "lsn", MAX_LSN) or None
        forked = await run_in_threadpool(volumes.forks.fork, source, vid, lsn)
        return msgpack_response(identified(vid, forked._asdict()))

    async def delete_volume(request: Request) -> Response:
        vid = request.path_params["vid"]
        deleted = await run_in_threadpool(delete, volumes.index, vid)
        return msgpack_response(deleted._asdict())

    routes = [
        Route("/v1/health", health, methods=["GET"]),
        # Counts by route template only, no volume names: open like health.
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/v1/volumes", guarded(READ, list_volumes), methods=["GET"]),
        Route("/v1/volumes/{vid}", guarded(READ, snapshot), methods=["GET"]),
        Route("/v1/volumes/{vid}", guarded(WRITE, delete_volume), methods=["DELETE"]),
        Route("/v1/volumes/{vid}/pull", guarded(READ, pull), methods=["POST"]),
        Route("/v1/volumes/{vid}/read", guarded(READ, read), methods=["POST"]),
        Route("/v1/volumes/{vid}/locate", guarded(READ, locate), methods=["POST"]),
        Route("/v1/volumes/{vid}/commit", guarded(WRITE, commit), methods=["POST"]),
        Route("/v1/volumes/{vid}/log/{lsn}", guarded(READ, log_entry), methods=["GET"]),
        Route("/v1/volumes/{vid}/history", guarded(READ, history), methods=["POST"]),
        Route("/v1/volumes/{vid}/fork", guarded(WRITE, fork), methods=["POST"]),
        Route("/v1/volumes/{vid}/at", guarded(READ, lsn_at), methods=["POST"]),
        # A segment names no volume: the commit that uses it is checked against its own.
        Route("/v1/segments", guarded(WRITE, upload), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(CountRequests, metrics=metrics)],
        exception_handlers={
            HTTPException: http_error_response,
            GraftError: error_response,
            # Anything else is a bug: still answer in the protocol's shape (500).
            Exception: error_response,
        },
    )
    app.state.volumes = volumes
    app.state.metrics = metrics
    return app
