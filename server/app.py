"""The HTTP edge of the server: the routes of docs/protocol.md, and nothing else.

Routes parse msgpack bodies, call ``Volumes`` (in a worker thread: all storage work
blocks), and encode the answer. Errors are turned into the protocol's JSON error
bodies in one place, ``ERRORS``; storage logic lives in volumes.py and segments.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgpack
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.config import LOG_LEVELS
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from graft_vfs.core.graft import decode_graft
from graft_vfs.core.segment import MAX_SEGMENT_PAGES
from graft_vfs.errors import (
    CommitConflict,
    CorruptData,
    Forbidden,
    GraftError,
    IdentityMismatch,
    InvalidRequest,
    InvalidVolumeId,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    Unauthorized,
    VolumeNotFound,
)
from server.auth import READ, WRITE, TokenFile, authorize
from server.gc import DEFAULT_GRACE, Retention, collect
from server.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    MAX_LOADED_VOLUMES,
)
from server.objstore import TEMPORARY_GRACE, FsStore, ObjectStore, open_store
from server.segments import SegmentCache, upload_segment
from server.volumes import Volumes, expected_identity

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]

MSGPACK = "application/x-msgpack"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# A client sends at most MAX_INLINE_PAGES (2048) pages per request: 8.05 MiB when
# they do not compress at all. A smaller limit would make large pushes fail.
MIN_MAX_BODY = 9 * 1024 * 1024
DEFAULT_CACHE = 256 * 1024 * 1024
LISTEN_BACKLOG = 2048  # connections wait here until uvicorn starts accepting
# The most a request's line and headers may take (h11's default limit is 16 KiB).
MAX_HEADER_BYTES = 64 * 1024
# File descriptors kept for everything but client connections: the store's files
# and S3 connections, the worker threads, the interpreter's own.
FD_RESERVE = 128

try:
    VERSION = version("graft-vfs")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "unknown"

log = logging.getLogger("graft.server")


class TooLarge(GraftError):
    """A request body is larger than the server's limit."""


class RequestTimeout(GraftError):
    """A request body did not arrive in full within the server's body timeout."""


class StartupError(GraftError):
    """The server cannot start (the address cannot be bound, the store is unusable)."""


# The protocol's error table. Looked up along the exception's MRO, so a subclass
# maps like its parent unless listed itself.
ERRORS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request"),
    InvalidVolumeId: (400, "invalid_volume_id"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    VolumeNotFound: (404, "volume_not_found"),
    SnapshotNotFound: (404, "snapshot_not_found"),
    SnapshotExpired: (410, "snapshot_expired"),
    CommitConflict: (409, "conflict"),
    RequestTimeout: (408, "request_timeout"),
    IdentityMismatch: (409, "identity_mismatch"),
    TooLarge: (413, "too_large"),
    CorruptData: (500, "corrupt_data"),
    StorageError: (503, "storage_error"),
}


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The JSON error body for any exception a route raised."""
    status, code = next(
        (ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS), (500, "internal_error")
    )
    body: dict[str, Any] = {"error": code, "message": str(exc)}
    headers = None
    if isinstance(exc, CommitConflict):
        body["latest_lsn"] = exc.latest_lsn
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


async def read_body(
    request: Request, limit: int, timeout: float = DEFAULT_BODY_TIMEOUT
) -> bytes:
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


def parse_lsn(text: str) -> int:
    # 20 digits hold any u64; the range itself is checked by Volumes.
    if not re.fullmatch(r"[0-9]{1,20}", text):
        raise InvalidRequest(f"invalid LSN {text[:40]!r} in path")
    return int(text)


Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(
    store: ObjectStore,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    cache_bytes: int = DEFAULT_CACHE,
    tokens: TokenFile | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_volumes: int = MAX_LOADED_VOLUMES,
) -> Starlette:
    """The ASGI app serving the volumes in ``store``; bodies over ``max_body`` get 413.

    ``cache_bytes`` bounds the in-memory cache of page frames (0 disables it). With
    ``tokens``, every route but health needs a bearer token whose scope covers it
    (401 without a valid one, 403 outside its scope); without, the server is open.
    A body that takes longer than ``body_timeout`` seconds to arrive gets 408; the
    page maps of at most ``max_volumes`` volumes stay in memory.
    """
    volumes = Volumes(
        store,
        cache=SegmentCache(cache_bytes) if cache_bytes else None,
        max_loaded=max_volumes,
    )

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
        return JSONResponse({"ok": True, "version": VERSION})

    async def list_volumes(request: Request) -> Response:
        token = getattr(request.state, "token", None)
        # Out-of-scope volumes are never loaded: their state (or damage) is not the
        # caller's business, and loading them would cost time for nothing.
        allowed = None if token is None else functools.partial(token.allows, READ)
        listed = await run_in_threadpool(volumes.list_volumes, allowed)
        return JSONResponse({"volumes": [v._asdict() for v in listed]})

    def identified(vid: str, answer: dict[str, Any]) -> dict[str, Any]:
        """``answer`` with the volume's and the store's identity, for the client to check."""
        identity = volumes.identity(vid)
        return {**answer, "volume_id": identity.volume_id, "store_id": identity.store_id}

    async def snapshot(request: Request) -> Response:
        vid = request.path_params["vid"]

        def answer() -> dict[str, Any]:
            return identified(vid, volumes.snapshot(vid)._asdict())

        return msgpack_response(await run_in_threadpool(answer))

    async def pull(request: Request) -> Response:
        vid = request.path_params["vid"]
        body = await read_map(request)

        def answer() -> dict[str, Any]:
            result = volumes.pull(vid, field(body, "since"))
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
        lsn = field(body, "lsn")
        pages = decode_graft(field(body, "pages"))
        expand = body.get("expand", 0)
        expected = expected_identity(body.get("store_id"), body.get("volume_id"))
        frames = await run_in_threadpool(
            volumes.read, request.path_params["vid"], lsn, pages, expand, expected
        )
        return msgpack_response({"lsn": lsn, "pages": [list(f) for f in frames]})

    async def upload(request: Request) -> Response:
        data = await read_body(request, max_body, body_timeout)
        sid = await run_in_threadpool(upload_segment, store, data)
        return msgpack_response({"sid": sid})

    async def commit(request: Request) -> Response:
        vid = request.path_params["vid"]
        body = await read_map(request)

        def answer() -> dict[str, Any]:
            lsn = volumes.commit(
                vid,
                base=field(body, "base"),
                page_count=field(body, "page_count"),
                hash=field(body, "hash"),
                segment=body.get("segment"),
                sids=body.get("segments"),
                expected=expected_identity(body.get("store_id"), body.get("volume_id")),
            )
            # A client that created the volume learns its identity here.
            return identified(vid, {"lsn": lsn})

        return msgpack_response(await run_in_threadpool(answer))

    async def log_entry(request: Request) -> Response:
        lsn = parse_lsn(request.path_params["lsn"])
        entry = await run_in_threadpool(volumes.log_entry, request.path_params["vid"], lsn)
        return msgpack_response(entry._asdict())

    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/volumes", guarded(READ, list_volumes), methods=["GET"]),
        Route("/v1/volumes/{vid}", guarded(READ, snapshot), methods=["GET"]),
        Route("/v1/volumes/{vid}/pull", guarded(READ, pull), methods=["POST"]),
        Route("/v1/volumes/{vid}/read", guarded(READ, read), methods=["POST"]),
        Route("/v1/volumes/{vid}/commit", guarded(WRITE, commit), methods=["POST"]),
        Route("/v1/volumes/{vid}/log/{lsn}", guarded(READ, log_entry), methods=["GET"]),
        # A segment names no volume: the commit that uses it is checked against its own.
        Route("/v1/segments", guarded(WRITE, upload), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: http_error_response,
            GraftError: error_response,
            # Anything else is a bug: still answer in the protocol's shape (500).
            Exception: error_response,
        },
    )
    app.state.volumes = volumes
    return app


def run_gc_periodically(
    volumes: Volumes, interval: float, retention: Retention, grace: float
) -> threading.Thread:
    """Start a daemon thread that runs a GC pass every ``interval`` seconds.

    Each pass also removes a directory store's temporaries left by killed writers.
    """

    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                report = collect(volumes, retention, grace=grace)
                log.info("gc: %s", report.as_dict())
                sweep_temporaries(volumes.store)
            except Exception:  # a failed pass is retried at the next interval
                log.exception("gc pass failed")

    thread = threading.Thread(target=loop, name="graft-gc", daemon=True)
    thread.start()
    return thread


LISTENING = "graft server listening on "  # then the URL; scripts and tests wait for it


def wait_until_listening(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The URL a started ``graft server`` process (stdout piped, text) listens on.

    Raises RuntimeError if it exits or prints no listening line within ``timeout``.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"graft server exited with {proc.wait()}")
        if line.startswith(LISTENING):
            return line[len(LISTENING) :].strip()
    raise RuntimeError(f"graft server did not start within {timeout} s")


def sweep_temporaries(store: ObjectStore) -> None:
    """Remove what writers killed mid-write left in a directory store (nothing else has any)."""
    if isinstance(store, FsStore):
        removed = store.remove_stale_temporaries(TEMPORARY_GRACE)
        if removed:
            log.info("removed %d temporary files left by interrupted writes", removed)


def guarded_protocol(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with a deadline for request headers and a connection cap.

    uvicorn closes idle keep-alive connections, but waits forever for the end of a
    request's headers, and accepts connections until it runs out of file descriptors:
    a few thousand connections that never finish a request then make every other
    request fail. Here a connection must finish its headers within ``header_timeout``
    seconds of opening (or of its previous response) and in at most MAX_HEADER_BYTES
    (httptools sets no limit of its own), and past ``max_connections`` open connections
    the one waiting longest for headers is closed to make room, else the one waiting
    longest for the rest of a request body (its request fails, as it would at the body
    timeout): connections that trickle bytes cannot hold every slot either.

    uvicorn's own ``limit_concurrency`` does not help here: it counts open connections
    when a request's headers are complete, so slow connections holding the slots make it
    answer 503 to the ordinary request, not to them.
    """
    # Connections waiting for request headers, and for the rest of a request body,
    # longest-waiting first (dicts keep insertion order).
    waiting: dict[_GuardedProtocol, None] = {}
    receiving: dict[_GuardedProtocol, None] = {}

    class _GuardedProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0  # received since the connection began waiting for headers

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()
            if len(self.connections) > max_connections:
                oldest = next((p for p in waiting if p is not self), None)
                oldest = oldest or next(iter(receiving), None)
                if oldest is not None:
                    oldest._close("closed to make room for a new connection")
                else:  # every other connection has a whole request being answered
                    self._refuse_busy()
                    transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            receiving.pop(self, None)
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._stop_waiting()
            receiving[self] = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            receiving.pop(self, None)
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self in waiting:  # still in a request's headers, or between requests
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                    self._stop_waiting()
                    self.send_400_response(f"request headers over {MAX_HEADER_BYTES} bytes")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Unless a pipelined request is already parsed, wait for the next headers.
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self._await_headers()

        def _await_headers(self) -> None:
            self._stop_waiting()
            waiting[self] = None
            self._header_bytes = 0
            self._deadline = self.loop.call_later(header_timeout, self._close, "header timeout")

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _close(self, why: str) -> None:
            self._stop_waiting()
            receiving.pop(self, None)
            if not self.transport.is_closing():
                log.debug("closing a connection from %s: %s", self.client, why)
                self.transport.close()

        def _refuse_busy(self) -> None:
            content = b"too many connections; retry later"
            head = [
                b"HTTP/1.1 503 Service Unavailable\r\n",
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(content)).encode() + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
            self.transport.write(b"".join(head) + content)

    return _GuardedProtocol


def connection_budget(wanted: int) -> int:
    """How many connections this process can hold open: ``wanted`` if its file
    descriptor limit allows (raising the soft limit toward the hard one if needed), else
    what the limit leaves after FD_RESERVE."""
    if resource is None:  # not on POSIX: no limit to read
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    budget = max(1, soft - FD_RESERVE)
    log.warning(
        "open files are limited to %d (ulimit -n): serving at most %d connections, "
        "not %d (raise the limit to %d for that)",
        soft,
        budget,
        wanted,
        needed,
    )
    return budget


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints its URL once it accepts connections."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            # Scripts and tests wait for this exact line, so it goes to stdout, flushed.
            print(f"{LISTENING}{self.url}", flush=True)


def configure_logging(level: str) -> None:
    """Send the server's own log lines (GC, denials, warnings) to stderr, as uvicorn does.

    ``level`` is one of uvicorn's (``LOG_LEVELS``: critical ... debug, trace); anything
    else is InvalidRequest.
    """
    if level.lower() not in LOG_LEVELS:
        raise InvalidRequest(f"unknown log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:  graft: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(LOG_LEVELS[level.lower()])


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (read it from getsockname).

    Raises StartupError, saying what to change, if the address cannot be used.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise StartupError(f"cannot listen on {host!r}: {exc} (check --host)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        hint = "another process uses that port: choose another --port, or stop it"
        if exc.errno != errno.EADDRINUSE:
            hint = "use an address of this machine for --host (0.0.0.0 for all)"
            if exc.errno == errno.EACCES:
                hint = "ports below 1024 need privileges: choose another --port"
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    return sock


def serve(
    store_spec: str,
    host: str = "127.0.0.1",
    port: int = 3000,
    log_level: str = "warning",
    *,
    s3_endpoint: str | None = None,
    cache_bytes: int = DEFAULT_CACHE,
    gc_interval: float | None = None,
    retention: Retention | None = None,
    gc_grace: float = DEFAULT_GRACE,
    tokens_file: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_volumes: int = MAX_LOADED_VOLUMES,
    store: ObjectStore | None = None,
) -> None:
    """Serve the store named by ``store_spec`` over HTTP until interrupted.

    ``store`` serves an already opened store instead (tests wrap one to inject faults).
    With ``gc_interval``, a GC pass (see server/gc.py) runs every that many seconds.
    With ``tokens_file`` (see server/auth.py), requests need a bearer token. See
    ``guarded_protocol`` for ``header_timeout`` and ``max_connections``, ``create_app``
    for the rest. Raises StartupError (before printing the listening line) if the store
    cannot be reached or the address cannot be bound.
    """
    configure_logging(log_level)
    if max_body < MIN_MAX_BODY:
        raise InvalidRequest(
            f"a body limit of {max_body} bytes is too small: clients send pushes of up to "
            f"{MAX_SEGMENT_PAGES} pages per request, so use at least {MIN_MAX_BODY} (9MiB)"
        )
    tokens = TokenFile(tokens_file) if tokens_file else None
    if tokens is not None and len(tokens) == 0:
        log.warning("token file %s has no tokens: every request but health gets 401", tokens_file)
    if store is None:
        store = open_store(store_spec, s3_endpoint)
    try:
        store.check()
    except StorageError as exc:
        raise StartupError(f"cannot use the store: {exc}") from None
    sweep_temporaries(store)
    app = create_app(
        store,
        cache_bytes=cache_bytes,
        tokens=tokens,
        max_body=max_body,
        body_timeout=body_timeout,
        max_volumes=max_volumes,
    )
    if gc_interval:
        run_gc_periodically(app.state.volumes, gc_interval, retention or Retention(), gc_grace)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    if tokens is None and not ipaddress.ip_address(bound_host).is_loopback:
        log.warning(
            "listening on %s without tokens: anyone who can reach it can read and write "
            "every volume (graft token create, then graft server --tokens FILE)",
            host,
        )
    shown_host = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        app,
        log_level=log_level.lower(),
        access_log=False,
        http=guarded_protocol(header_timeout, connection_budget(max_connections)),
    )
    _AnnouncingServer(config, f"http://{shown_host}:{bound_port}").run(sockets=[sock])
