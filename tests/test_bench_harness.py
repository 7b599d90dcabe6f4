"""The benchmark harness's own instruments (benchmarks/): what they count must be right.

The benchmark data has graft_vfs.sample's rows plus a unique key; the link proxy's
counters feed the round-trip target of the 20-row index query and the
cold-lookup breakdown; the capacity model turns measured figures into docs/capacity.md;
the report renders the optional pass-through VFS section, or says it was skipped. No
timing is asserted: only what was counted and how it adds up.
"""

from __future__ import annotations

import http.client
import http.server
import os
import threading
from collections.abc import Iterator

import apsw
import pytest

from benchmarks import capacity, report
from benchmarks.data import DataSpec, _sample, order_ref
from benchmarks.linkproxy import Link, ProxyProcess
from graft_vfs.sample import make_sample_database

DELAY = 0.05


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one connection

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def proxied() -> Iterator[tuple[ProxyProcess, int]]:
    """A real HTTP server on loopback behind a real link proxy process (+50 ms a request)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxies = ProxyProcess()
    try:
        port = proxies.add("t", server.server_address[1])
        proxies.set_link("t", Link("test", DELAY, None))
        yield proxies, port
    finally:
        proxies.close()
        server.shutdown()
        server.server_close()


def _get(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and len(resp.read()) == 1000


def test_sequential_requests_are_round_trips_each(proxied):
    proxies, port = proxied
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(3):
            _get(conn)
    finally:
        conn.close()
    s = proxies.stats("t")
    assert s["requests"] == 3
    assert s["busy_periods"] == 3
    # each request held for the delay, the first on its connection for twice that
    assert s["delay_seconds"] >= 4 * DELAY * 0.9
    assert s["busy_seconds"] == pytest.approx(s["busy_wall_seconds"])
    assert s["busy_wall_seconds"] >= s["delay_seconds"] * 0.9


def test_parallel_requests_are_one_round_trip(proxied):
    proxies, port = proxied
    n = 4
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.connect()
            barrier.wait()
            _get(conn)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = proxies.stats("t")
    assert s["requests"] == n
    assert s["busy_periods"] == 1  # all held at once for 2 x DELAY: one period
    assert s["busy_seconds"] > 2 * s["busy_wall_seconds"]  # request-seconds add up
    proxies.reset("t")
    assert proxies.stats("t")["busy_periods"] == 0


FIGURES = {
    "measured": "2026-11-30",
    "machine": "test, 2 cores",
    "git_commit": "abc1234",
    "pages_per_server_cpu_s_demand_warm": 2000.0,
    "pages_per_server_cpu_s_demand_cold": 250.0,
    "pages_per_server_cpu_s_batch_warm": 30000.0,
    "pages_per_server_cpu_s_batch_cold": 300.0,
    "server_cpu_ms_per_request_demand_warm": 0.5,
    "server_cpu_ms_per_request_demand_cold": 4.0,
    "pages_per_s_measured_demand_warm": 800.0,
    "store_requests_per_page_cold": 1.0,
    "server_cpu_ms_per_commit": 10.0,
    "store_requests_per_commit": 3.0,
    "store_writes_per_commit": 2.0,
    "store_bytes_up_per_commit": 5000.0,
    "lookup_source": "test",
    "requests_per_lookup": 1.0,
    "pages_per_lookup": 2.0,
    "bytes_per_lookup": 5000.0,
    "store_requests_per_lookup_server_warm": 0.0,
    "store_requests_per_lookup_server_cold": 2.0,
    "store_requests_per_100_lookups_after_restart": 300.0,
}


def test_capacity_model_adds_up():
    # 1,000 clients x 1 lookup/s x 1 request x 0.5 ms = 0.5 core, plus 100 commits/s x
    # 10 ms = 1 core: 1.5 cores at 70% -> 3 servers (cold: 4 ms a request -> 5 cores)
    m = capacity.model(FIGURES, 1000, 1.0, 0.1)
    assert m["servers_cache_warm"] == 3
    assert m["servers_cache_cold"] == 8  # (4 + 1) / 0.7 = 7.1 -> 8
    assert m["store_gets_per_day_cold"] == pytest.approx(1000 * 2.0 * 86_400)
    assert m["store_writes_per_day"] == pytest.approx(100 * 2.0 * 86_400)
    prices = capacity.PRICES
    assert m["usd_per_day_store_reads_cold"] == pytest.approx(
        1000 * 2.0 * 86_400 / 1000 * prices["get_per_1000"]
    )
    # writes are priced with the other commit requests (3 per commit in all)
    assert m["usd_per_day_store_writes"] == pytest.approx(
        100 * 3.0 * 86_400 / 1000 * prices["put_per_1000"]
    )
    big = capacity.model(FIGURES, 1_000_000, 1.0, 0.1)
    assert big["servers_cache_warm"] == pytest.approx(1000 * 1.5 / 0.7, abs=1)


def test_capacity_doc_is_rewritten_between_its_markers(tmp_path):
    doc = tmp_path / "capacity.md"
    with open(os.path.join(os.path.dirname(capacity.DOC), "capacity.md")) as f:
        original = f.read()
    assert capacity.BEGIN in original and capacity.END in original
    doc.write_text(original)
    capacity.update_doc(FIGURES, str(doc))
    text = doc.read_text()
    assert "Measured on 2026-11-30" in text and "| 1,000,000 |" in text
    assert text.split(capacity.BEGIN)[0] == original.split(capacity.BEGIN)[0]
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no capacity markers"):
        capacity.update_doc(FIGURES, str(bare))


def test_pass_through_section_says_when_it_was_skipped():
    assert report.passthrough_lines({}) == []
    skipped = {"passthrough": {"skipped": "skipped: benchmarks/warm.py is not there"}}
    assert report.passthrough_lines(skipped) == ["  skipped: benchmarks/warm.py is not there"]
    rows = {"passthrough": {"rows": [{"workload": "scan", "ratio": 1.25}, {"workload": "x"}]}}
    assert report.passthrough_lines(rows) == [
        "  workload | ratio",
        "  scan | 1.25",
        "  x | ",
    ]
    nested = {"passthrough": {"lookups": {"graft_per_s": 1234.5, "ratio": 0.9}}}
    assert report.passthrough_lines(nested) == [
        "  lookups.graft_per_s: 1234",
        "  lookups.ratio: 0.9",
    ]


def test_benchmark_orders_are_the_sample_rows_with_a_unique_key(tmp_path):
    spec = DataSpec(orders=2000, wide_rows=0)
    sample = apsw.Connection(make_sample_database(str(tmp_path / "s.db"), orders=2000, seed=7))
    ours = apsw.Connection(str(tmp_path / "b.db"))
    try:
        _sample(ours, spec)
        cols = "id, customer_id, created, amount, note"
        got = ours.execute(f"SELECT {cols} FROM orders ORDER BY id").fetchall()
        assert got == sample.execute(f"SELECT {cols} FROM orders ORDER BY id").fetchall()
        refs = [r for (r,) in ours.execute("SELECT ref FROM orders ORDER BY id")]
        assert refs == [order_ref(i) for i in range(1, 2001)]
        assert len(set(refs)) == len(refs)
        plan = ours.execute("EXPLAIN QUERY PLAN SELECT id FROM orders WHERE ref = ?", (refs[7],))
        assert "orders_ref" in " ".join(str(row) for row in plan.fetchall())
    finally:
        ours.close()
        sample.close()


def test_prefetch_lines_put_one_tree_next_to_the_whole_volume():
    assert report.prefetch_lines({}) == []
    run = {
        "seconds": 0.5,
        "first_row_seconds": 0.5,
        "requests": 6,
        "round_trips": 3,
        "bytes_down": 49_000_000,
        "bytes_up": 1000,
        "pages_fetched": 20_000,
        "pages": 20_000,
        "check_requests": 0,
        "rows_agree": True,
        "runs": [0.5],
        "digest": None,
        "how": "measured",
    }
    hydrate = run | {"seconds": 2.0, "bytes_down": 130_000_000, "pages_fetched": 32_596}
    # as scenarios.modelled computes a run over the budget (scenarios needs the bench
    # extra): the loopback run's figures, its time with the link's delays and pacing
    slow = hydrate | {"seconds": 67.4, "how": "modelled from the loopback run"}
    lines = report.prefetch_lines(
        {
            "prefetch": {
                "loopback": {"prefetch": run, "hydrate": hydrate},
                "slow": {"prefetch": run, "hydrate": slow},
            }
        }
    )
    assert lines[0].startswith("loopback  graft_prefetch('orders') 0.500 s, 20000 pages")
    assert "6 requests in 3 round trips" in lines[0] and "rows agree" in lines[0]
    assert lines[0].endswith("graft_hydrate 2.000 s, 32596 pages, 130 MB (4.0x the time)")
    assert "graft_hydrate 67.4 s**" in lines[1]
