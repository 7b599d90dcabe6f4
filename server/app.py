"""The HTTP edge of the server: the routes of docs/protocol.md, and nothing else.

Routes parse msgpack bodies, call ``Volumes`` (in a worker thread: all storage work
blocks), and encode the answer. Errors are turned into the protocol's JSON error
bodies in one place, ``ERRORS``; storage logic lives in volumes.py and segments.py.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Mapping
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
    GraftError,
    InvalidRequest,
    InvalidVolumeId,
    SnapshotExpired,
    SnapshotNotFound,
    StorageError,
    VolumeNotFound,
)
from server.objstore import ObjectStore, open_store
from server.gc import DEFAULT_GRACE, Retention, collect
from server.segments import SegmentCache, upload_segment
from server.volumes import Volumes

MSGPACK = "application/x-msgpack"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
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
    VolumeNotFound: (404, "volume_not_found"),
    SnapshotNotFound: (404, "snapshot_not_found"),
    SnapshotExpired: (410, "snapshot_expired"),
    CommitConflict: (409, "conflict"),
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
    if isinstance(exc, CommitConflict):
        body["latest_lsn"] = exc.latest_lsn
    if status >= 500 and isinstance(exc, GraftError):  # uvicorn logs unexpected errors itself
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse(body, status)


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


def create_app(
    store: ObjectStore, *, max_body: int = DEFAULT_MAX_BODY, cache_bytes: int = DEFAULT_CACHE
) -> Starlette:
    """The ASGI app serving the volumes in ``store``; bodies over ``max_body`` get 413.

    ``cache_bytes`` bounds the in-memory cache of page frames (0 disables it).
    """
    volumes = Volumes(store, cache=SegmentCache(cache_bytes) if cache_bytes else None)

    async def read_map(request: Request) -> dict[str, Any]:
        return decode_body(await read_body(request, max_body))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "version": VERSION})

    async def list_volumes(request: Request) -> Response:
        snapshots = await run_in_threadpool(volumes.list_volumes)
        return JSONResponse({"volumes": [s._asdict() for s in snapshots]})

    async def snapshot(request: Request) -> Response:
        snap = await run_in_threadpool(volumes.snapshot, request.path_params["vid"])
        return msgpack_response(snap._asdict())

    async def pull(request: Request) -> Response:
        vid = request.path_params["vid"]
        body = await read_map(request)
        result = await run_in_threadpool(volumes.pull, vid, field(body, "since"))
        return msgpack_response(
            {
                "vid": vid,
                "lsn": result.lsn,
                "page_count": result.page_count,
                "graft": result.graft.serialize(),
            }
        )

    async def read(request: Request) -> Response:
        body = await read_map(request)
        lsn = field(body, "lsn")
        pages = decode_graft(field(body, "pages"))
        expand = body.get("expand", 0)
        frames = await run_in_threadpool(
            volumes.read, request.path_params["vid"], lsn, pages, expand
        )
        return msgpack_response({"lsn": lsn, "pages": [list(f) for f in frames]})

    async def upload(request: Request) -> Response:
        data = await read_body(request, max_body)
        sid = await run_in_threadpool(upload_segment, store, data)
        return msgpack_response({"sid": sid})

    async def commit(request: Request) -> Response:
        body = await read_map(request)
        lsn = await run_in_threadpool(
            volumes.commit,
            request.path_params["vid"],
            base=field(body, "base"),
            page_count=field(body, "page_count"),
            hash=field(body, "hash"),
            segment=body.get("segment"),
            sids=body.get("segments"),
        )
        return msgpack_response({"lsn": lsn})

    async def log_entry(request: Request) -> Response:
        lsn = parse_lsn(request.path_params["lsn"])
        entry = await run_in_threadpool(volumes.log_entry, request.path_params["vid"], lsn)
        return msgpack_response(entry._asdict())

    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/volumes", list_volumes, methods=["GET"]),
        Route("/v1/volumes/{vid}", snapshot, methods=["GET"]),
        Route("/v1/volumes/{vid}/pull", pull, methods=["POST"]),
        Route("/v1/volumes/{vid}/read", read, methods=["POST"]),
        Route("/v1/volumes/{vid}/commit", commit, methods=["POST"]),
        Route("/v1/volumes/{vid}/log/{lsn}", log_entry, methods=["GET"]),
        Route("/v1/segments", upload, methods=["POST"]),
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


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints its URL once it accepts connections."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            # Scripts and tests wait for this exact line, so it goes to stdout, flushed.
            print(f"graft server listening on {self.url}", flush=True)


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
) -> None:
    """Serve the store named by ``store_spec`` over HTTP until interrupted.

    With ``gc_interval``, a GC pass (see server/gc.py) runs every that many seconds.
    """
    app = create_app(open_store(store_spec, s3_endpoint), cache_bytes=cache_bytes)
    if gc_interval:
        run_gc_periodically(app.state.volumes, gc_interval, retention or Retention(), gc_grace)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level=log_level, access_log=False)
    _AnnouncingServer(config, f"http://{shown_host}:{bound_port}").run(sockets=[sock])
