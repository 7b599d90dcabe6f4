"""The HTTP edge of the server: the routes of docs/protocol.md, and nothing else.

Routes parse msgpack bodies, call ``Volumes`` (in a worker thread: all storage work
blocks), and encode the answer. Errors are turned into the protocol's JSON error
bodies in one place, ``ERRORS``; storage logic lives in volumes.py and segments.py.
"""

from __future__ import annotations

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

from graft_vfs.core.graft import decode_graft
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
from server.objstore import ObjectStore, open_store
from server.segments import SegmentCache, upload_segment
from server.volumes import Volumes, expected_identity

MSGPACK = "application/x-msgpack"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# A client sends at most MAX_INLINE_PAGES (2048) pages per request: 8.05 MiB when
# they do not compress at all. A smaller limit would make large pushes fail.
MIN_MAX_BODY = 9 * 1024 * 1024
DEFAULT_CACHE = 256 * 1024 * 1024
LISTEN_BACKLOG = 2048  # connections wait here until uvicorn starts accepting

try:
    VERSION = version("graft-vfs")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "unknown"

log = logging.getLogger("graft.server")


class TooLarge(GraftError):
    """A request body is larger than the server's limit."""


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before buffering them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidRequest(f"invalid Content-Length {declared[:40]!r}")
        if int(declared) > limit:
            raise TooLarge(f"body of {declared} bytes is over the limit of {limit}")
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
) -> Starlette:
    """The ASGI app serving the volumes in ``store``; bodies over ``max_body`` get 413.

    ``cache_bytes`` bounds the in-memory cache of page frames (0 disables it). With
    ``tokens``, every route but health needs a bearer token whose scope covers it
    (401 without a valid one, 403 outside its scope); without, the server is open.
    """
    volumes = Volumes(store, cache=SegmentCache(cache_bytes) if cache_bytes else None)

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
        return decode_body(await read_body(request, max_body))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "version": VERSION})

    async def list_volumes(request: Request) -> Response:
        snapshots = await run_in_threadpool(volumes.list_volumes)
        token = getattr(request.state, "token", None)
        if token is not None:
            snapshots = [s for s in snapshots if token.allows(READ, s.vid)]
        return JSONResponse({"volumes": [s._asdict() for s in snapshots]})

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
        data = await read_body(request, max_body)
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
    """Start a daemon thread that runs a GC pass every ``interval`` seconds."""

    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                report = collect(volumes, retention, grace=grace)
                log.info("gc: %s", report.as_dict())
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
    """Send the server's own log lines (GC, denials, warnings) to stderr, as uvicorn does."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:  graft: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (read it from getsockname)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
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
    store: ObjectStore | None = None,
) -> None:
    """Serve the store named by ``store_spec`` over HTTP until interrupted.

    ``store`` serves an already opened store instead (tests wrap one to inject faults).
    With ``gc_interval``, a GC pass (see server/gc.py) runs every that many seconds.
    With ``tokens_file`` (see server/auth.py), requests need a bearer token.
    """
    configure_logging(log_level)
    if max_body < MIN_MAX_BODY:
        raise InvalidRequest(
            f"a body limit of {max_body} bytes is too small: clients send pushes of up to "
            f"2048 pages per request, so use at least {MIN_MAX_BODY} (9MiB)"
        )
    tokens = TokenFile(tokens_file) if tokens_file else None
    if tokens is not None and len(tokens) == 0:
        log.warning("token file %s has no tokens: every request but health gets 401", tokens_file)
    app = create_app(
        store if store is not None else open_store(store_spec, s3_endpoint),
        cache_bytes=cache_bytes,
        tokens=tokens,
        max_body=max_body,
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
    config = uvicorn.Config(app, log_level=log_level, access_log=False)
    _AnnouncingServer(config, f"http://{shown_host}:{bound_port}").run(sockets=[sock])
