"""Prometheus metrics of one server process, at ``GET /metrics`` (prometheus-client).

Requests are counted and timed by route template (``/v1/volumes/{vid}/read``), never by
volume name, so the series stay few and name no volume. Object-store calls, the frame
cache and GC are read from the counters those parts already keep, when scraped: the
store's requests from the store itself, its bytes and failed calls from the
``CountingStore`` the app wraps it in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graft_server.objstore import CountingStore
from graft_server.segments import SegmentCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets, seconds: a warm read is a few ms, a cold one on S3 tens.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Parts(Collector):
    """What the store, the frame cache and GC count, read at each scrape."""

    def __init__(self, store: CountingStore, cache: SegmentCache | None, gc: GcCounters) -> None:
        self.store, self.cache, self.gc = store, cache, gc

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily(
            "graft_store_requests", "Object-store requests, by operation", labels=["op"]
        )
        for op, count in sorted(getattr(self.store, "stats", {}).items()):
            calls.add_metric([op], count)
        yield calls
        for name, direction, counts in (
            ("graft_store_read_bytes", "read from", self.store.read_bytes),
            ("graft_store_written_bytes", "written to", self.store.written_bytes),
        ):
            family = CounterMetricFamily(
                name, f"Bytes {direction} the object store, by operation", labels=["op"]
            )
            for op, count in sorted(counts.items()):
                family.add_metric([op], count)
            yield family
        errors = CounterMetricFamily(
            "graft_store_errors",
            "Object-store calls that failed (after the store's retries), by operation and kind",
            labels=["op", "kind"],
        )
        for (op, kind), count in sorted(self.store.errors.items()):
            errors.add_metric([op, kind], count)
        yield errors
        if self.cache is not None:
            for name, value in (("hits", self.cache.hits), ("misses", self.cache.misses)):
                yield CounterMetricFamily(
                    f"graft_frame_cache_{name}", f"Page-frame cache {name}", value=value
                )
            yield GaugeMetricFamily(
                "graft_frame_cache_bytes", "Bytes in the page-frame cache", value=self.cache.bytes
            )
        yield CounterMetricFamily("graft_gc_runs", "GC passes run", value=self.gc.runs)
        yield CounterMetricFamily(
            "graft_gc_failures", "GC passes that failed", value=self.gc.failed
        )
        yield CounterMetricFamily(
            "graft_gc_segments_deleted", "Segments GC deleted", value=self.gc.segments_deleted
        )
        yield CounterMetricFamily(
            "graft_gc_records_deleted", "Log records GC deleted", value=self.gc.records_deleted
        )


class GcCounters:
    """What the periodic GC thread did (serve.run_gc_periodically adds to it)."""

    def __init__(self) -> None:
        self.runs = self.failed = self.segments_deleted = self.records_deleted = 0


class Metrics:
    def __init__(self, store: CountingStore, cache: SegmentCache | None) -> None:
        self.registry = CollectorRegistry()
        self.gc = GcCounters()
        self.requests = Counter(
            "graft_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "graft_http_request_seconds",
            "Time to answer an HTTP request, by route and method",
            ["route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.commits = Counter(
            "graft_commits", "Commits that landed (new LSNs)", registry=self.registry
        )
        self.conflicts = Counter(
            "graft_commit_conflicts",
            "Commits refused because their base was not the latest LSN",
            registry=self.registry,
        )
        self.errors = Counter(
            "graft_errors", "Error answers, by protocol code", ["code"], registry=self.registry
        )
        self.registry.register(_Parts(store, cache, self.gc))

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)


class CountRequests:
    """ASGI middleware: every HTTP request counted and timed by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router puts the matched route in the scope (a template, never a name).
            template = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(template, method, str(status)).inc()
            elapsed = time.perf_counter() - started
            self.metrics.latency.labels(template, method).observe(elapsed)
