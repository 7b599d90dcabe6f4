"""Serving: the uvicorn server around the app, its start-up checks, limits and GC thread.

``serve`` is what ``graft server`` and ``python -m graft_server`` run: it checks the
store, binds the socket, guards connections (header deadline, header size, connection
cap; see ``guarded_protocol``), runs GC periodically if asked, and prints ``LISTENING``
with the URL once it accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import anyio.to_thread
import uvicorn
from uvicorn.config import LOG_LEVELS
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from graft_server.auth import TokenFile
from graft_server.direct import DirectReads
from graft_server.gc import DEFAULT_GRACE, Retention, collect
from graft_server.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_DIRECT_EXPIRY,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    MAX_LOADED_VOLUMES,
)
from graft_server.metrics import GcCounters
from graft_server.objstore import TEMPORARY_GRACE, FsStore, ObjectStore, open_store
from graft_server.s3store import S3Store
from graft_server.volumes import Volumes
from graft_vfs.core.errors import (
    GraftError,
    InvalidRequest,
    StorageError,
)
from graft_vfs.core.segment import MAX_SEGMENT_PAGES

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]

from graft_server.app import (
    DEFAULT_CACHE,
    DEFAULT_MAX_BODY,
    create_app,
)
from graft_vfs.core.protocol import MIN_MAX_BODY

LISTEN_BACKLOG = 2048  # connections wait here until uvicorn starts accepting
# The most a request's line and headers may take (h11's default limit is 16 KiB).
MAX_HEADER_BYTES = 64 * 1024
# File descriptors kept for everything but client connections: the store's files
# and S3 connections, the worker threads, the interpreter's own.
FD_RESERVE = 128

log = logging.getLogger("graft.server")


class StartupError(GraftError):
    """The server cannot start (the address cannot be bound, the store is unusable)."""


def run_gc_periodically(
    volumes: Volumes,
    interval: float,
    retention: Retention,
    grace: float,
    counters: GcCounters | None = None,
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
                if counters is not None:
                    counters.failed += 1
                continue
            if counters is not None:
                counters.runs += 1
                counters.segments_deleted += report.segments_deleted
                counters.records_deleted += report.records_deleted

    thread = threading.Thread(target=loop, name="graft-gc", daemon=True)
    thread.start()
    return thread


LISTENING = "graft server listening on "  # then the URL; scripts and tests wait for it


def sweep_temporaries(store: ObjectStore) -> None:
    """Remove what writers killed mid-write left in a directory store (nothing else has any)."""
    store = getattr(store, "inner", store)  # the app's CountingStore wraps it
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

    def __init__(self, config: uvicorn.Config, url: str, announce: str = LISTENING) -> None:
        super().__init__(config)
        self.url, self.announce = url, announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Handlers run in a thread pool whose event-loop backend anyio imports on first
        # use: tens of milliseconds of a cold server's first request, paid here instead.
        await anyio.to_thread.run_sync(lambda: None)
        await super().startup(sockets=sockets)
        if self.started:
            # Scripts and tests wait for this exact line, so it goes to stdout, flushed.
            print(f"{self.announce}{self.url}", flush=True)


def serve_app(app: Any, host: str, port: int, announce: str, log_level: str = "warning") -> None:
    """Serve another app (``graft replica``) as the server is served: bound, announced."""
    configure_logging(log_level)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False)
    _AnnouncingServer(config, f"http://{shown_host}:{bound_port}", announce).run(sockets=[sock])


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
    direct: bool = False,
    direct_endpoint: str | None = None,
    direct_expiry: int = DEFAULT_DIRECT_EXPIRY,
    access_log: bool = False,
) -> None:
    """Serve the store named by ``store_spec`` over HTTP until interrupted.

    ``store`` serves an already opened store instead (tests wrap one to inject faults).
    With ``gc_interval``, a GC pass (see server/gc.py) runs every that many seconds.
    With ``tokens_file`` (see server/auth.py), requests need a bearer token. See
    ``guarded_protocol`` for ``header_timeout`` and ``max_connections``, ``create_app``
    for the rest. With ``direct`` and an S3 store, clients may read frames from S3 with
    presigned URLs signed for ``direct_endpoint`` (default the store's endpoint), valid
    ``direct_expiry`` seconds (server/direct.py). Raises StartupError (before printing
    the listening line) if the store cannot be reached or the address cannot be bound.
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
    offered = None
    if direct and isinstance(store, S3Store):
        offered = DirectReads(store.presigner(direct_endpoint), direct_expiry)
    elif direct_endpoint:
        log.warning("--direct-endpoint ignored: direct reads need an S3 store (s3://...)")
    app = create_app(
        store,
        cache_bytes=cache_bytes,
        tokens=tokens,
        max_body=max_body,
        body_timeout=body_timeout,
        max_volumes=max_volumes,
        direct=offered,
    )
    if gc_interval:
        run_gc_periodically(
            app.state.volumes,
            gc_interval,
            retention or Retention(),
            gc_grace,
            app.state.metrics.gc,
        )
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
        access_log=access_log,
        http=guarded_protocol(header_timeout, connection_budget(max_connections)),
    )
    if access_log:  # its lines are INFO: shown whatever --log-level (never a token: no headers)
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    _AnnouncingServer(config, f"http://{shown_host}:{bound_port}").run(sockets=[sock])
