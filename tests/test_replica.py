"""`graft replica`: stateless read replicas answering SQL over HTTP, real processes."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import select
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

import graft_vfs
from graft_vfs.replica import SEND_GRACE
from support.clients import pragma
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)

READY = "graft replica listening on "


def start_replica(*args: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "graft_vfs.cli", "replica", *args, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        line = proc.stdout.readline() if ready else ""
        if line.startswith(READY):
            return proc, line[len(READY) :].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"graft replica exited: {proc.stderr.read() if proc.stderr else ''}")
    raise RuntimeError("graft replica did not start")


def query(url: str, method: str = "GET", **fields) -> urllib3.BaseHTTPResponse:
    if method == "GET":
        return urllib3.request("GET", url + "/v1/query", fields=fields)
    return urllib3.request("POST", url + "/v1/query", body=json.dumps(fields).encode())


@pytest.fixture
def replicas(request):
    started: list[subprocess.Popen] = []

    def start(*args: str) -> str:
        proc, url = start_replica(*args)
        started.append(proc)
        return url

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            sys.stderr.write(proc.stderr.read()[-4000:])


def test_three_replicas_answer_what_native_sqlite_answers_at_their_lsn(
    server, vid, client, replicas
):
    writer = client(vid, options=graft_vfs.Options(autopush=False))
    writer.execute("CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT)")
    writer.executemany("INSERT INTO kv VALUES(?, ?)", [(k, "v0") for k in range(50)])
    history = {pragma(writer, "graft_push")["remote_lsn"]: [[k, "v0"] for k in range(50)]}
    urls = [replicas(vid, "--remote", server.url, "--pull-interval", "0.05") for _ in range(3)]

    answered: set[int] = set()
    for i in range(1, 9):
        with writer:
            writer.execute("UPDATE kv SET v = ? WHERE k % 9 = ?", (f"v{i}", i % 9))
        rows = [list(r) for r in writer.execute("SELECT k, v FROM kv ORDER BY k")]
        history[pragma(writer, "graft_push")["remote_lsn"]] = rows
        for url in urls:
            resp = query(url, sql="SELECT k, v FROM kv ORDER BY k")
            assert resp.status == 200, resp.data
            answer = resp.json()
            assert answer["columns"] == ["k", "v"] and not answer["truncated"]
            assert answer["rows"] == history[answer["lsn"]]  # exact, at the LSN it reports
            assert resp.headers["Graft-LSN"] == str(answer["lsn"])
            answered.add(answer["lsn"])
    latest = max(history)
    for url in urls:  # read your writes: min_lsn waits for the writer's LSN
        answer = query(
            url, "POST", sql="SELECT count(*) AS n FROM kv WHERE v = 'v8'", min_lsn=latest
        ).json()
        assert answer["lsn"] >= latest and answer["rows"] == [[sum(k % 9 == 8 for k in range(50))]]
    assert len(answered) > 1  # the replicas followed the writer

    # /metrics: queries by volume and status, and the lag behind the server.
    with writer:
        writer.execute("UPDATE kv SET v = 'late'")
    head = pragma(writer, "graft_push")["remote_lsn"]
    samples = {}
    for family in text_string_to_metric_families(
        urllib3.request("GET", urls[0] + "/metrics").data.decode()
    ):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("graft_replica_queries_total", (("status", "200"), ("volume", vid)))] == 9
    lag = samples[("graft_replica_lag_lsns", (("volume", vid),))]
    assert 0 <= lag <= head - latest
    assert samples[("graft_replica_lag_seconds", (("volume", vid),))] >= 0


def test_a_replica_refuses_writes_and_bounds_time_and_rows(server, vid, client, replicas):
    writer = client(vid)
    writer.execute("CREATE TABLE t(x)")
    writer.executemany("INSERT INTO t VALUES(?)", [(i,) for i in range(30)])
    pragma(writer, "graft_push")
    url = replicas(vid, "--remote", server.url, "--max-rows", "10", "--timeout", "5")

    for sql in (
        "INSERT INTO t VALUES(99)",
        "DELETE FROM t",
        "CREATE TABLE u(y)",
        "ATTACH 'file:/tmp/x.db' AS x",
        "PRAGMA graft_reset",
    ):
        resp = query(url, "POST", sql=sql)
        assert resp.status == 403 and resp.json()["error"] == "read_only", sql
    endless = (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c"
    )
    resp = query(url, sql=endless, timeout="0.2")
    assert resp.status == 408 and resp.json()["error"] == "timeout"
    answer = query(url, sql="SELECT x FROM t ORDER BY x").json()
    assert answer["rows"] == [[i] for i in range(10)] and answer["truncated"] is True
    answer = query(url, "POST", sql="SELECT x FROM t WHERE x > ? ORDER BY x", params=[25]).json()
    assert answer["rows"] == [[26], [27], [28], [29]] and answer["truncated"] is False

    text = query(url, sql="SELECT x, x * 2 AS y FROM t WHERE x < 3", format="csv").data.decode()
    assert list(csv.reader(io.StringIO(text))) == [["x", "y"], ["0", "0"], ["1", "2"], ["2", "4"]]
    lines = query(url, sql="SELECT x FROM t WHERE x < 2", format="ndjson").data.decode()
    head, *rows, end = [json.loads(line) for line in lines.splitlines()]
    assert head["columns"] == ["x"] and rows == [[0], [1]]
    assert end == {"rows": 2, "truncated": False}
    lines = query(url, sql="SELECT x FROM t ORDER BY x", format="ndjson").data.decode()
    head, *rows, end = [json.loads(line) for line in lines.splitlines()]
    assert rows == [[i] for i in range(10)] and end == {"rows": 10, "truncated": True}
    # Interrupted before its first row: 408, as in JSON. After its first rows: an error line.
    resp = query(url, sql=endless, timeout="0.2", format="ndjson")
    assert resp.status == 408 and resp.json()["error"] == "timeout"

    assert query(url, sql="SELEC nothing").status == 400
    huge = urllib3.request("POST", url + "/v1/query", body=b"x" * 2_000_000)
    assert huge.status == 413 and huge.json()["error"] == "too_large"
    assert query(url, sql="SELECT 1", volume="other").status == 404
    assert query(url, sql="SELECT 1", max_rows="x").status == 400


def open_transactions(url: str) -> float:
    """The replica's read transactions still open (queries not answered in full)."""
    text = urllib3.request("GET", url + "/metrics").data.decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "graft_replica_open_transactions":
                return s.value
    raise AssertionError("no graft_replica_open_transactions in /metrics")


class SmallWindow(http.client.HTTPConnection):
    """A connection whose socket takes in little before its reader reads (a loopback's
    buffers, grown by the kernel, could otherwise hold a whole answer)."""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before the handshake
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        self.sock = sock


def stream(url: str, **fields) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """An NDJSON query whose answer is read as it comes (``readline``), on its own socket."""
    address = urllib.parse.urlsplit(url)
    conn = SmallWindow(address.hostname, address.port, timeout=30)
    conn.request("GET", "/v1/query?" + urllib.parse.urlencode({**fields, "format": "ndjson"}))
    return conn, conn.getresponse()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ndjson_is_streamed_at_one_snapshot_and_released_when_the_client_goes(
    server, vid, client, replicas
):
    writer = client(vid, options=graft_vfs.Options(autopush=False))
    writer.execute("CREATE TABLE big(k INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    n = 30_000  # about 13 MB of NDJSON: far more than the sockets' buffers hold
    with writer:
        writer.executemany(
            "INSERT INTO big VALUES(?, ?, randomblob(300))", [(k, f"row {k}") for k in range(n)]
        )
    lsn = pragma(writer, "graft_push")["remote_lsn"]
    native = [
        [k, v, {"base64": base64.b64encode(b).decode()}]
        for k, v, b in writer.execute("SELECT k, v, b FROM big ORDER BY k")
    ]
    url = replicas(vid, "--remote", server.url, "--pull-interval", "0.05", "--max-rows", str(n))
    sql = "SELECT k, v, b FROM big ORDER BY k"

    conn, resp = stream(url, sql=sql)
    try:
        assert resp.status == 200 and resp.headers["Graft-LSN"] == str(lsn)
        head = json.loads(resp.readline())
        assert head == {"volume": vid, "lsn": lsn, "columns": ["k", "v", "b"]}
        assert json.loads(resp.readline()) == native[0]
        # The first rows are here, the rest is not even read: the stream waits on this
        # client, in its transaction, while the writer commits and the replica pulls.
        time.sleep(0.3)
        assert open_transactions(url) == 1
        with writer:
            writer.execute("UPDATE big SET v = 'changed'")
        newer = pragma(writer, "graft_push")["remote_lsn"]
        wait_until(lambda: query(url, sql="SELECT 1").json()["lsn"] == newer)
        rows = [json.loads(line) for line in resp.read().splitlines()]
    finally:
        conn.close()
    assert rows[-1] == {"rows": n, "truncated": False}
    assert [native[0], *rows[:-1]] == native  # every row, all at the snapshot of its LSN
    wait_until(lambda: open_transactions(url) == 0)

    # Clients that go away mid-stream: each stream held its own transaction until then
    # (taken in turns by the replica's worker threads), and nothing is left open.
    streams = [stream(url, sql=sql) for _ in range(3)]
    for conn, resp in streams:
        assert json.loads(resp.readline())["lsn"] == newer
        assert json.loads(resp.readline())[0] == 0
    assert open_transactions(url) == 3
    for conn, resp in streams:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    wait_until(lambda: open_transactions(url) == 0)
    with writer:
        writer.execute("UPDATE big SET v = 'last' WHERE k = 0")
    last = pragma(writer, "graft_push")["remote_lsn"]
    answer = query(url, "POST", sql="SELECT v FROM big WHERE k < 2", min_lsn=last).json()
    assert answer["lsn"] == last and answer["rows"] == [["last"], ["changed"]]


def test_a_stream_past_its_time_limit_ends_with_an_error_line(server, vid, client, replicas):
    writer = client(vid)
    writer.execute("CREATE TABLE t(x)")
    pragma(writer, "graft_push")
    url = replicas(vid, "--remote", server.url, "--timeout", "5", "--max-rows", "200000")
    # 700 rows at once (more than a batch), then a long search for more that finds none.
    slow = (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) "
        "SELECT n FROM c WHERE n <= 700 OR n > 1e15"
    )
    started = time.monotonic()
    conn, resp = stream(url, sql=slow, timeout="0.5")
    try:
        assert resp.status == 200
        head, *rows, end = [json.loads(line) for line in resp.read().splitlines()]
    finally:
        conn.close()
    assert time.monotonic() - started < 4
    assert head["columns"] == ["n"] and rows == [[n] for n in range(1, 701)]
    assert end["error"] == "timeout" and end["rows"] == 700 and "truncated" not in end
    wait_until(lambda: open_transactions(url) == 0)

    # A client that stops reading: cut (no last line) SEND_GRACE seconds past the limit.
    many = (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200000) "
        "SELECT n, hex(randomblob(100)) AS h FROM c"
    )  # about 45 MB: far more than the sockets' buffers hold
    started = time.monotonic()
    conn, resp = stream(url, sql=many, timeout="1")
    try:
        assert json.loads(resp.readline())["columns"] == ["n", "h"]
        time.sleep(0.5)
        assert open_transactions(url) == 1  # waiting on this client
        wait_until(lambda: open_transactions(url) == 0, timeout=15)
        assert 1 + SEND_GRACE - 0.5 < time.monotonic() - started < 1 + SEND_GRACE + 5
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()  # what the buffers held, then the end of the connection
    finally:
        conn.close()
    lines = cut.value.partial.splitlines()
    assert 0 < len(lines) < 200_000 and not any(b'"rows"' in line for line in lines)


@pytest.mark.stores("fs")  # (the server goes away: its store does not matter)
def test_a_stream_whose_server_goes_away_ends_with_an_error_line(
    own_server, vid, replicas, tmp_path
):
    own_server.start()
    writer = graft_vfs.connect(vid, remote=own_server.url, cache_dir=str(tmp_path / "w"))
    try:
        writer.execute("CREATE TABLE big(k INTEGER PRIMARY KEY, b BLOB)")
        with writer:
            writer.executemany(
                "INSERT INTO big VALUES(?, randomblob(3000))", [(k,) for k in range(3000)]
            )
        pragma(writer, "graft_push")
    finally:
        writer.close()
    # The replica's cache is empty: it fetches the table's pages as the stream goes.
    url = replicas(vid, "--remote", own_server.url, "--max-rows", "3000", "--pull-interval", "60")
    conn, resp = stream(url, sql="SELECT k, length(b) FROM big")
    try:
        assert json.loads(resp.readline())["columns"] == ["k", "length(b)"]
        own_server.kill()
        lines = [json.loads(line) for line in resp.read().splitlines()]
    finally:
        conn.close()
    *rows, end = lines
    assert end["error"] == "remote_error" and "unreachable" in end["message"]
    assert 0 < end["rows"] == len(rows) < 3000  # every row fetched was sent, then the end
    assert all(length == 3000 for _, length in rows)
    wait_until(lambda: open_transactions(url) == 0)
