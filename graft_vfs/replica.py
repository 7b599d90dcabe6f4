"""`graft replica`: a stateless read replica that answers SQL over HTTP.

It starts with an empty cache (a temporary directory unless ``--cache``), pulls every
``pull_interval`` seconds (and on demand for ``min_lsn``), and answers read-only SQL on
``GET`` or ``POST /v1/query``: rows as JSON, NDJSON or CSV, each answer with the LSN it
read. Writes are refused by an authorizer before they run (403), a query runs at most
``timeout`` seconds (then it is interrupted: 408) and answers at most ``max_rows`` rows
(``truncated`` says so). With a token file, a query needs a token that may read its
volume, as on the server. Any number of replicas may run anywhere: they hold nothing
that the server does not have.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import apsw
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import graft_vfs
from graft_vfs.client.catchup import LsnNotReached, wait_for_lsn
from graft_vfs.core.errors import GraftError

DEFAULT_MAX_ROWS = 10_000
DEFAULT_TIMEOUT = 10.0  # seconds a query may run
MAX_SQL = 100_000  # characters of SQL one query may send
MAX_BODY = 4 * MAX_SQL + 1_000_000  # bytes of a POST body: the SQL and its parameters
FORMATS = {"json", "ndjson", "csv"}

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
        self.vfs = "graft-replica"
        options = graft_vfs.Options(token=token, autopush=False, pull_interval=pull_interval)
        self.runtime = graft_vfs.register(remote, cache_dir, name=self.vfs, options=options)
        for vid in self.volumes:  # fails now, not at the first query, for a missing volume
            self.runtime.volume(vid, create=False).sync.pull()

    def close(self) -> None:
        graft_vfs.unregister(self.vfs)

    def query(
        self, vid: str, sql: str, params: Any, min_lsn: int | None, max_rows: int, timeout: float
    ) -> dict[str, Any]:
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
        try:
            # A read takes the transaction's snapshot (and pins it); then its LSN.
            con.execute("BEGIN; SELECT count(*) FROM sqlite_schema").fetchall()
            snapshot = con.execute("PRAGMA graft_snapshot").fetchone()
            assert snapshot is not None  # a graft PRAGMA answers one row
            lsn = json.loads(snapshot[0])["remote_lsn"]
            con.authorizer = _authorize
            deadline = started + timeout
            con.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
            try:
                cursor = con.execute(sql, params)
                columns = [d[0] for d in cursor.getdescription()] if _has_rows(cursor) else []
                rows: list[list[Any]] = []
                for values in cursor:
                    if len(rows) == max_rows:
                        break
                    rows.append([_json_value(v) for v in values])
                truncated = len(rows) == max_rows and next(cursor, None) is not None
            except apsw.AuthError:
                raise QueryError(
                    403,
                    "read_only",
                    "this replica answers read-only SQL (SELECT); write on a client of the server",
                ) from None
            except apsw.InterruptError:
                raise QueryError(
                    408,
                    "timeout",
                    f"the query ran over {timeout:g} s; ask for less or raise timeout",
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
            finally:
                con.authorizer = None
                con.set_progress_handler(None)
            con.execute("COMMIT")
        finally:
            con.close()
        return {"volume": vid, "lsn": lsn, "columns": columns, "rows": rows, "truncated": truncated}


def _has_rows(cursor: apsw.Cursor) -> bool:
    try:
        cursor.getdescription()
    except apsw.ExecutionCompleteError:
        return False
    return True


def _json_value(v: Any) -> Any:
    """A value as JSON holds it: a blob as ``{"base64": ...}``."""
    return {"base64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v


def _render(answer: dict[str, Any], fmt: str) -> Response:
    headers = {"Graft-LSN": str(answer["lsn"])}
    if fmt == "json":
        return JSONResponse(answer, headers=headers)
    if fmt == "ndjson":
        head = {k: answer[k] for k in ("volume", "lsn", "columns", "truncated")}
        lines = [json.dumps(head)] + [json.dumps(r) for r in answer["rows"]]
        return Response("\n".join(lines) + "\n", media_type="application/x-ndjson", headers=headers)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(answer["columns"])
    writer.writerows(answer["rows"])
    return Response(out.getvalue(), media_type="text/csv", headers=headers)


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
        answer = await _answer(request)
        volume = getattr(request.state, "volume", "-")  # a served volume, or "-"
        metrics.queries.labels(volume, str(answer.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
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
            answer = await run_in_threadpool(
                replica.query, vid, sql, params, min_lsn, max_rows, timeout
            )
            return _render(answer, fmt)
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
