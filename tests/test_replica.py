"""`graft replica`: stateless read replicas answering SQL over HTTP, real processes."""

from __future__ import annotations

import csv
import io
import json
import select
import subprocess
import sys
import time

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

import graft_vfs
from support.clients import pragma

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
    head, *rows = [json.loads(line) for line in lines.splitlines()]
    assert head["columns"] == ["x"] and rows == [[0], [1]]

    assert query(url, sql="SELEC nothing").status == 400
    huge = urllib3.request("POST", url + "/v1/query", body=b"x" * 2_000_000)
    assert huge.status == 413 and huge.json()["error"] == "too_large"
    assert query(url, sql="SELECT 1", volume="other").status == 404
    assert query(url, sql="SELECT 1", max_rows="x").status == 400
