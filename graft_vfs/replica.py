"""`graft replica`: a stateless read replica that answers SQL over HTTP.

It starts with an empty cache (a temporary directory unless ``--cache``), pulls every
``pull_interval`` seconds (and on demand for ``min_lsn``), and answers read-only SQL on
``GET`` or ``POST /v1/query``: rows as JSON, NDJSON or CSV, each answer with the LSN it
read. Writes are refused by an authorizer before they run (403), a query runs at most
``timeout`` seconds (then it is interrupted: 408) and answers at most ``max_rows`` rows
(``truncated`` says so). With a token file, a query needs a token that may read its
volume, as on the server. Any number of replicas may run anywhere: they hold nothing
that the server does not have.

NDJSON is streamed: lines are sent as the cursor yields rows, in batches, so the first
arrives before the last is read and no answer is held whole in memory. The LSN is fixed
before the first byte (the ``Graft-LSN`` header), and the read transaction that holds
that snapshot lives as long as the stream: it ends with the last line, or as soon as the
client goes away. A failure before the first row is an HTTP status (408 for the time
limit), as for JSON and CSV; once rows are on their way, the stream ends with an error
line instead of its summary line. One ``Rows`` is only ever used by one thread at a
time (its lock): the worker threads that fetch its batches take turns, never overlap.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import apsw
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import graft_vfs
from graft_vfs.client.catchup import LsnNotReached, wait_for_lsn
from graft_vfs.core.errors import GraftError, RemoteError

DEFAULT_MAX_ROWS = 10_000
DEFAULT_TIMEOUT = 10.0  # seconds a query may run
MAX_SQL = 100_000  # characters of SQL one query may send
MAX_BODY = 4 * MAX_SQL + 1_000_000  # bytes of a POST body: the SQL and its parameters
FORMATS = {"json", "ndjson", "csv"}
BATCH_ROWS = 500  # rows an NDJSON stream fetches (in a worker thread) per chunk it sends
BATCH_BYTES = 256 * 1024  # ... or fewer, once their values (strings, blobs) reach this size
SEND_GRACE = 5.0  # seconds past the time limit a client has to take a stream's last lines

log = logging.getLogger("graft.server.replica")  # shown as serve_app shows the server's

# What a read-only query may do: read tables, call functions, run a SELECT. Everything
# else (writes, ATTACH, PRAGMAs, schema changes) is refused before it runs.
_ALLOWED = {apsw.SQLITE_SELECT, apsw.SQLITE_READ, apsw.SQLITE_FUNCTION, apsw.SQLITE_RECURSIVE}


class QueryError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _authorize(op: int, *args: Any) -> int:
    return apsw.SQLITE_OK if op in _ALLOWED else apsw.SQLITE_DENY


class Replica:
    def __init__(
        self,
        volumes: list[str],
        remote: str,
        cache_dir: str,
        *,
        token: str | None = None,
        pull_interval: float = 1.0,
        max_rows: int = DEFAULT_MAX_ROWS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.volumes = list(dict.fromkeys(volumes))
        self.max_rows, self.timeout = max_rows, timeout
        self.lock = threading.Lock()
        self.open_transactions = 0  # read transactions of queries not closed yet
        self.vfs = "graft-replica"
        options = graft_vfs.Options(token=token, autopush=False, pull_interval=pull_interval)
        self.runtime = graft_vfs.register(remote, cache_dir, name=self.vfs, options=options)
        for vid in self.volumes:  # fails now, not at the first query, for a missing volume
            self.runtime.volume(vid, create=False).sync.pull()

    def close(self) -> None:
        graft_vfs.unregister(self.vfs)

    def query(
        self, vid: str, sql: str, params: Any, min_lsn: int | None, max_rows: int, timeout: float
    ) -> Rows:
        """The running query, its first batch (at most ``BATCH_ROWS``) already fetched, so
        that what fails early fails before an answer starts; the caller closes it."""
        if vid not in self.volumes:
            raise QueryError(404, "volume_not_found", f"this replica serves {self.volumes}")
        started = time.monotonic()
        if min_lsn is not None:
            try:
                wait_for_lsn(self.runtime.volume(vid, create=False), min_lsn, timeout)
            except LsnNotReached as exc:
                raise QueryError(504, "lsn_not_reached", str(exc)) from None
        con = apsw.Connection(
            f"file:{vid}", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READONLY, vfs=self.vfs
        )
        rows = None
        try:
            # A read takes the transaction's snapshot (and pins it); then its LSN.
            con.execute("BEGIN; SELECT count(*) FROM sqlite_schema").fetchall()
            snapshot = con.execute("PRAGMA graft_snapshot").fetchone()
            assert snapshot is not None  # a graft PRAGMA answers one row
            lsn = json.loads(snapshot[0])["remote_lsn"]
            rows = Rows(self, con, vid, lsn, max_rows, started + timeout, timeout)
            with _sql_errors(timeout):
                con.authorizer = _authorize
                con.set_progress_handler(rows.past_deadline, 1000)
                rows.cursor = con.execute(sql, params)
                rows.columns = (
                    [d[0] for d in rows.cursor.getdescription()] if _has_rows(rows.cursor) else []
                )
            rows.first = rows.fetch(BATCH_ROWS, BATCH_BYTES)
        except BaseException:
            if rows is not None:
                rows.close()
            else:
                con.close()
            raise
        return rows


class Rows:
    """A query's rows as its cursor yields them, in the read transaction of its snapshot.

    ``fetch`` returns the next rows (as JSON values); ``done`` once the cursor is
    exhausted or ``max_rows`` were returned (``truncated`` if more were left); ``close``
    ends the transaction (its snapshot unpinned) and the connection. Every method holds
    the lock: worker threads may take turns on it, never run it at once.
    """

    def __init__(
        self,
        replica: Replica,
        con: apsw.Connection,
        vid: str,
        lsn: int,
        max_rows: int,
        deadline: float,
        timeout: float,
    ) -> None:
        self.replica, self.con, self.vid, self.lsn = replica, con, vid, lsn
        self.max_rows, self.deadline, self.timeout = max_rows, deadline, timeout
        self.cursor: apsw.Cursor | None = None
        self.columns: list[str] = []
        self.first: list[list[Any]] = []
        self.count = 0
        self.done = self.truncated = self.closed = False
        self.failed: QueryError | apsw.Error | None = None
        self._lock = threading.Lock()
        with replica.lock:
            replica.open_transactions += 1

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def fetch(self, limit: int, max_bytes: int | None = None) -> list[list[Any]]:
        """At most ``limit`` more rows, fewer once their strings and blobs (8 bytes for any
        other value: about their JSON's size) reach ``max_bytes``.

        A failure after some rows returns those, and is raised by the next call.
        """
        out: list[list[Any]] = []
        with self._lock:
            if self.closed:
                raise QueryError(500, "closed", "the query was closed")
            if self.failed is not None:
                raise self.failed
            if self.done or self.cursor is None:
                self.done = True
                return out
            try:
                self._fetch(out, limit, max_bytes)
            except (QueryError, apsw.Error) as exc:
                if not out:
                    raise
                self.failed = exc
        return out

    def _fetch(self, out: list[list[Any]], limit: int, max_bytes: int | None) -> None:
        assert self.cursor is not None
        size = 0
        with _sql_errors(self.timeout):
            if self.past_deadline():  # (the client may have taken long to read)
                raise apsw.InterruptError("past the deadline")
            while True:
                if self.count == self.max_rows:
                    self.truncated = next(self.cursor, None) is not None
                    self.done = True
                    return
                if len(out) >= limit:
                    return
                values = next(self.cursor, None)
                if values is None:
                    self.done = True
                    return
                row = [_json_value(v) for v in values]
                out.append(row)
                self.count += 1
                if max_bytes is not None:
                    size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in values)
                    if size >= max_bytes:
                        return

    def rest(self) -> list[list[Any]]:
        """Every row not fetched yet (up to ``max_rows`` in all)."""
        return self.fetch(self.max_rows)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.con.authorizer = None
                self.con.set_progress_handler(None)
                if self.con.in_transaction:
                    self.con.execute("COMMIT")  # (a read transaction: ends it)
            finally:
                self.con.close()
                with self.replica.lock:
                    self.replica.open_transactions -= 1

    def answer(self) -> dict[str, Any]:
        """The whole answer (JSON, CSV), the transaction closed."""
        try:
            rows = self.first + self.rest()
        finally:
            self.close()
        return {
            "volume": self.vid,
            "lsn": self.lsn,
            "columns": self.columns,
            "rows": rows,
            "truncated": self.truncated,
        }


@contextmanager
def _sql_errors(timeout: float) -> Iterator[None]:
    """SQLite's refusals and failures of a query, as the replica answers them."""
    try:
        yield
    except apsw.AuthError:
        raise QueryError(
            403,
            "read_only",
            "this replica answers read-only SQL (SELECT); write on a client of the server",
        ) from None
    except apsw.InterruptError:
        raise QueryError(
            408, "timeout", f"the query ran over {timeout:g} s; ask for less or raise timeout"
        ) from None
    except (
        apsw.SQLError,
        apsw.BindingsError,
        apsw.ExecutionCompleteError,
        apsw.MismatchError,
        apsw.RangeError,
        TypeError,
        ValueError,
    ) as exc:
        raise QueryError(400, "invalid_query", str(exc)) from None


def _has_rows(cursor: apsw.Cursor) -> bool:
    try:
        cursor.getdescription()
    except apsw.ExecutionCompleteError:
        return False
    return True


def _json_value(v: Any) -> Any:
    """A value as JSON holds it: a blob as ``{"base64": ...}``."""
    return {"base64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v


def _render(rows: Rows, fmt: str) -> dict[str, Any] | str:
    """The whole answer of a JSON or CSV query (in a worker thread: it reads the rest)."""
    answer = rows.answer()
    if fmt == "json":
        return answer
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(answer["columns"])
    writer.writerows(answer["rows"])
    return out.getvalue()


def _failure_code(exc: apsw.Error) -> str:
    """The protocol's code for a failed read of the volume (``storage_error``, ...)."""
    from graft_vfs.core.protocol import wire_error

    cause = exc.__cause__
    if isinstance(cause, RemoteError):  # the server unreachable, or failing
        return "remote_error"
    return wire_error(cause).code if isinstance(cause, GraftError) else "internal_error"


def _json(value: Any) -> str:
    """One NDJSON line's text, compact as the JSON answers are."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _lines(rows: list[list[Any]]) -> str:
    return "".join(_json(r) + "\n" for r in rows)


class _RowStream(StreamingResponse):
    """An NDJSON answer sent as its rows are fetched (see the module's docstring).

    The first line is ``{"volume", "lsn", "columns"}``, each row a JSON array, and the
    last line an object: ``{"rows": N, "truncated": bool}`` when every row was sent, or
    ``{"error", "message", "rows"}`` when the query failed midway (408 ``timeout`` past
    the time limit). A stream without that last line was cut (the client or the network
    went away). Its transaction is released when the stream ends, whatever ends it, and
    a client that stops reading is cut ``SEND_GRACE`` seconds past the time limit.
    """

    def __init__(self, rows: Rows, finished: Callable[[], None]) -> None:
        self.rows, self.finished = rows, finished
        super().__init__(
            self._chunks(),
            media_type="application/x-ndjson",
            headers={"Graft-LSN": str(rows.lsn)},
        )

    async def _chunks(self) -> AsyncIterator[str]:
        rows = self.rows
        head = {"volume": rows.vid, "lsn": rows.lsn, "columns": rows.columns}
        yield _json(head) + "\n" + _lines(rows.first)
        rows.first = []
        while not rows.done:
            try:
                batch = await run_in_threadpool(rows.fetch, BATCH_ROWS, BATCH_BYTES)
            except (QueryError, apsw.Error) as exc:  # (apsw: the volume could not be read)
                code = exc.code if isinstance(exc, QueryError) else _failure_code(exc)
                end = {"error": code, "message": str(exc), "rows": rows.count}
                yield _json(end) + "\n"
                return
            yield _lines(batch)
        yield _json({"rows": rows.count, "truncated": rows.truncated}) + "\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            limit = self.rows.deadline + SEND_GRACE - time.monotonic()
            with anyio.move_on_after(limit) as sending:
                await super().__call__(scope, receive, send)
            if sending.cancelled_caught:  # (uvicorn then closes the connection)
                log.warning(
                    "a client stopped reading the answer of a query on %r: cut %g s past "
                    "its time limit, %d rows fetched",
                    self.rows.vid,
                    SEND_GRACE,
                    self.rows.count,
                )
        finally:
            with anyio.CancelScope(shield=True):  # released even when cancelled
                await run_in_threadpool(self.rows.close)
            self.finished()


def _fields(source: dict[str, Any], replica: Replica) -> tuple[Any, ...]:
    def number(name: str, kind: type, default: Any, high: float) -> Any:
        raw = source.get(name, default)
        try:
            value = kind(raw) if raw is not None else None
        except (TypeError, ValueError):
            raise QueryError(400, "invalid_request", f"{name} must be a number") from None
        if value is not None and not 0 <= value <= high:
            raise QueryError(400, "invalid_request", f"{name} must be in [0, {high:g}]")
        return value

    sql = source.get("sql")
    if not isinstance(sql, str) or not sql.strip() or len(sql) > MAX_SQL:
        raise QueryError(
            400, "invalid_request", f"give sql: one statement, at most {MAX_SQL} characters"
        )
    params = source.get("params", [])
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            raise QueryError(
                400, "invalid_request", "params must be a JSON list or object"
            ) from None
    if not isinstance(params, (list, dict)):
        raise QueryError(400, "invalid_request", "params must be a JSON list or object")
    fmt = source.get("format", "json")
    if fmt not in FORMATS:
        raise QueryError(400, "invalid_request", f"format must be one of {sorted(FORMATS)}")
    vid = source.get("volume") or (replica.volumes[0] if len(replica.volumes) == 1 else None)
    if not isinstance(vid, str):
        raise QueryError(400, "invalid_request", f"give volume: one of {replica.volumes}")
    return (
        vid,
        sql,
        params,
        number("min_lsn", int, None, 2**63 - 1),
        number("max_rows", int, replica.max_rows, replica.max_rows),
        number("timeout", float, replica.timeout, replica.timeout),
        fmt,
    )


class _Lag(Collector):
    """Each volume's lag behind the server, measured at each scrape (one request each)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.caught_up: dict[str, float] = {}

    def collect(self) -> Iterator[Any]:
        lsns = GaugeMetricFamily(
            "graft_replica_lag_lsns",
            "LSNs the server has that this replica has not pulled",
            labels=["volume"],
        )
        seconds = GaugeMetricFamily(
            "graft_replica_lag_seconds",
            "Seconds since this replica last had the server's latest LSN (0: it has it now)",
            labels=["volume"],
        )
        runtime = self.replica.runtime
        for vid in self.replica.volumes:
            try:
                head = runtime.require_remote().snapshot(vid).lsn
                have = runtime.volume(vid, create=False).refresh().remote_lsn
            except GraftError:
                continue  # the server unreachable: no sample rather than a wrong one
            now = time.monotonic()
            if have >= head:
                self.caught_up[vid] = now
            lsns.add_metric([vid], max(head - have, 0))
            seconds.add_metric([vid], now - self.caught_up.setdefault(vid, now))
        yield lsns
        yield seconds


class _Open(Collector):
    """Read transactions of queries still open: streams being sent, answers being read."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "graft_replica_open_transactions",
            "Read transactions (pinned snapshots) of queries not answered in full yet",
            value=self.replica.open_transactions,
        )


class _ReplicaMetrics:
    def __init__(self, replica: Replica) -> None:
        self.registry = CollectorRegistry()
        self.queries = Counter(
            "graft_replica_queries",
            "Queries answered, by volume and HTTP status",
            ["volume", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "graft_replica_query_seconds", "Time to answer a query", registry=self.registry
        )
        self.registry.register(_Lag(replica))
        self.registry.register(_Open(replica))


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    too_large = QueryError(413, "too_large", f"the query body is over {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(replica: Replica, tokens: Any = None) -> Starlette:
    """The replica's HTTP app; ``tokens`` a ``graft_server.auth.TokenFile`` or None."""
    metrics = _ReplicaMetrics(replica)

    async def scrape(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def query(request: Request) -> Response:
        started = time.perf_counter()
        volume = "-"

        def finished(status: int) -> None:
            metrics.queries.labels(volume, str(status)).inc()
            metrics.latency.observe(time.perf_counter() - started)

        answer = await _answer(request)
        volume = getattr(request.state, "volume", "-")  # a served volume, or "-"
        if isinstance(answer, _RowStream):
            answer.finished = lambda: finished(200)  # counted (and timed) once sent
        else:
            finished(answer.status_code)
        return answer

    async def _answer(request: Request) -> Response:
        try:
            if request.method == "POST":
                body = await _bounded_body(request, MAX_BODY)
                try:
                    source = json.loads(body)
                except ValueError:
                    raise QueryError(400, "invalid_request", "the body must be JSON") from None
                if not isinstance(source, dict):
                    raise QueryError(400, "invalid_request", "the body must be a JSON object")
            else:
                source = dict(request.query_params)
            vid, sql, params, min_lsn, max_rows, timeout, fmt = _fields(source, replica)
            if vid in replica.volumes:
                request.state.volume = vid
            if tokens is not None:
                from graft_server.auth import READ, authorize

                token = tokens.authenticate(request.headers.get("authorization"))
                authorize(token, READ, vid)
            rows = await run_in_threadpool(
                replica.query, vid, sql, params, min_lsn, max_rows, timeout
            )
            if fmt == "ndjson":
                return _RowStream(rows, lambda: None)
            headers = {"Graft-LSN": str(rows.lsn)}
            rendered = await run_in_threadpool(_render, rows, fmt)
            if isinstance(rendered, dict):
                return JSONResponse(rendered, headers=headers)
            return Response(rendered, media_type="text/csv", headers=headers)
        except QueryError as exc:
            return JSONResponse({"error": exc.code, "message": str(exc)}, exc.status)
        except GraftError as exc:
            from graft_vfs.core.protocol import wire_error

            error = wire_error(exc)
            return JSONResponse({"error": error.code, "message": str(exc)}, error.status)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "volumes": replica.volumes})

    return Starlette(
        routes=[
            Route("/v1/health", health, methods=["GET"]),
            Route("/v1/query", query, methods=["GET", "POST"]),
            Route("/metrics", scrape, methods=["GET"]),
        ]
    )
