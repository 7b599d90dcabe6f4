"""Prometheus metrics at GET /metrics and the access log, on a real server process."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import apsw
import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

import graft_vfs
from graft_server.objstore import CountingStore, FsStore
from graft_server.s3store import S3Store
from graft_vfs.core.errors import InvalidRequest, StorageError
from support.clients import pragma
from support.s3 import SeaweedFS, s3_env
from support.servers import STORE_KINDS, ServerProcess, wait_until_listening


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels, parsed with prometheus-client."""
    resp = urllib3.request("GET", url + "/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.data.decode())
        for s in family.samples
    }


def test_metrics_count_requests_commits_conflicts_and_store_calls(tmp_path, vid, connect):
    log = open(tmp_path / "server.log", "w+")
    cmd = [
        sys.executable,
        "-m",
        "graft_vfs.cli",
        "server",
        "--store",
        str(tmp_path / "store"),
        "--port",
        "0",
        "--access-log",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url = wait_until_listening(proc)
        opts = graft_vfs.Options(autopush=False)
        a = connect(vid, remote=url, cache_dir=str(tmp_path / "a"), options=opts)
        a.execute("CREATE TABLE t(x)")
        pragma(a, "graft_push")
        b = connect(vid, remote=url, cache_dir=str(tmp_path / "b"), options=opts)
        a.execute("INSERT INTO t VALUES(1)")
        b.execute("INSERT INTO t VALUES(2)")
        pragma(a, "graft_push")
        with pytest.raises(apsw.SQLError, match="diverged"):
            b.execute("PRAGMA graft_push")

        m = scrape(url)
        commit = (("method", "POST"), ("route", "/v1/volumes/{vid}/commit"))
        assert m[("graft_http_requests_total", (*commit[:1], *commit[1:], ("status", "200")))] == 2
        assert m[("graft_http_requests_total", (*commit, ("status", "409")))] == 1
        assert m[("graft_http_request_seconds_count", commit)] == 3
        assert m[("graft_commits_total", ())] == 2
        assert m[("graft_commit_conflicts_total", ())] == 1
        assert m[("graft_errors_total", (("code", "conflict"),))] == 1
        assert m[("graft_store_requests_total", (("op", "puts"),))] >= 4  # 2 segments, 2 logs
        assert ("graft_frame_cache_hits_total", ()) in m
        assert m[("graft_gc_runs_total", ())] == 0
        # No volume name in any series: the route template stands for it.
        assert not any(vid in str(labels) for _, labels in m)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.seek(0)
    assert proc.stdout is not None
    out = proc.stdout.read() + log.read()  # (uvicorn's access lines go to stdout)
    lines = [line for line in out.splitlines() if f"/v1/volumes/{vid}/commit" in line]
    assert len(lines) == 3 and sum("409" in line for line in lines) == 1


def store_bytes(m: dict, family: str) -> dict[str, float]:
    """The samples of one bytes or errors family, by their labels."""
    return {labels: v for (name, labels), v in m.items() if name == f"{family}_total"}


def objects(srv: ServerProcess) -> dict[str, int]:
    """Every object in the server's store and its size, as the tests' own store sees it."""
    backing = srv._backing()
    return {key: len(backing.get(key) or b"") for key in backing.list("")}


@contextmanager
def own_store(kind: str, tmp_path) -> Iterator[tuple[ServerProcess, Callable[[], None]]]:
    """A server (not started) on a store of its own, and a way to make that store fail:
    for a directory, each segment replaced by a symlink to itself (ELOOP on any read);
    for S3, its SeaweedFS stopped."""
    if kind == "fs":
        srv = ServerProcess(str(tmp_path / "store"))

        def damage() -> None:
            for path in (tmp_path / "store" / "segments").rglob("*"):
                if path.is_file():
                    path.unlink()
                    path.symlink_to(path.name)

        yield srv, damage
        srv.stop()
        return
    weed = SeaweedFS().start()
    try:
        prefix = weed.new_prefix()
        srv = ServerProcess(
            weed.spec(prefix),
            env=s3_env(),
            kind="s3",
            s3_endpoint=weed.endpoint,
            backing=weed.store(prefix),
        )
        yield srv, weed.stop
        srv.stop()
    finally:
        weed.stop()


@pytest.mark.parametrize("store", STORE_KINDS)
def test_store_bytes_are_what_a_commit_wrote_and_a_cold_read_fetched(store, tmp_path, vid, connect):
    rows = 400  # about 100 pages of incompressible blobs
    with own_store(store, tmp_path) as (srv, damage):
        srv.start()
        opts = graft_vfs.Options(autopush=False)
        a = connect(vid, remote=srv.url, cache_dir=str(tmp_path / "a"), options=opts)
        a.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, b BLOB)")
        pragma(a, "graft_push")
        # A missing volume is an answer (404), never a store error.
        assert urllib3.request("GET", srv.url + "/v1/volumes/no-such-volume").status == 404

        before, m = objects(srv), scrape(srv.url)
        with a:
            a.executemany("INSERT INTO t VALUES(?, randomblob(1000))", [(k,) for k in range(rows)])
        pragma(a, "graft_push")
        after, m2 = objects(srv), scrape(srv.url)
        written = {k: size for k, size in after.items() if before.get(k) != size}
        assert len(written) >= 2  # a segment and a log record at least
        grew = m2[("graft_store_written_bytes_total", (("op", "puts"),))]
        grew -= m[("graft_store_written_bytes_total", (("op", "puts"),))]
        assert grew == sum(written.values()), (grew, written)
        segments = sum(size for k, size in written.items() if k.startswith("segments/"))
        assert segments > rows * 1000  # the blobs did not compress
        assert store_bytes(m2, "graft_store_errors") == {}

        # A cold server (empty frame cache, no log loaded) and a client with an empty cache.
        srv.stop()
        srv.start()
        cold = scrape(srv.url)
        b = connect(vid, remote=srv.url, cache_dir=str(tmp_path / "b"), options=opts)
        assert b.execute("SELECT count(*), sum(length(b)) FROM t").fetchone() == (rows, rows * 1000)
        m3 = scrape(srv.url)
        read = {
            op: m3[("graft_store_read_bytes_total", (("op", op),))]
            - cold[("graft_store_read_bytes_total", (("op", op),))]
            for op in ("gets", "range_gets")
        }
        # Every frame of the table's segment was read, and no object more than once.
        assert segments * 0.95 <= sum(read.values()) <= sum(after.values()), (read, after)
        assert read["range_gets"] >= segments * 0.95  # frames come in byte ranges
        assert store_bytes(m3, "graft_store_errors") == {}

        # The store fails: reads from it are counted as errors, by operation and kind.
        srv.stop()
        srv.start()  # (a server checks its store before it listens)
        damage()
        with pytest.raises(apsw.Error):  # (page 1 is read as the connection opens)
            c = connect(vid, remote=srv.url, cache_dir=str(tmp_path / "c"), options=opts)
            c.execute("SELECT sum(length(b)) FROM t").fetchall()
        errors = store_bytes(scrape(srv.url), "graft_store_errors")
        kind = "io" if store == "fs" else "unavailable"
        assert errors and all(labels[0] == ("kind", kind) for labels in errors), errors
        assert scrape(srv.url)[("graft_errors_total", (("code", "storage_error"),))] >= 1


class _Answering(http.server.BaseHTTPRequestHandler):
    """An HTTP service that fails as told: a status (with S3's XML error), or silence."""

    mode = "503"

    def _answer(self) -> None:
        if self.mode == "silent":
            time.sleep(2)  # past the store's read timeout
            return
        body = b"<Error><Code>Failure</Code></Error>"
        self.send_response(int(self.mode))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_failed_store_calls_are_counted_by_operation_and_kind(tmp_path):
    # A directory: a symlink loop is an I/O error; a missing key and a bad key are not.
    fs = CountingStore(FsStore(tmp_path / "store"))
    fs.put("a", b"12345")
    (tmp_path / "store" / "loop").symlink_to("loop")
    with pytest.raises(StorageError, match="symbolic links"):
        fs.get_range("loop", 0, 10)
    assert fs.get("missing") is None and fs.get("a") == b"12345"
    with pytest.raises(InvalidRequest):
        fs.get("../escape")
    assert fs.errors == {("range_gets", "io"): 1}
    assert fs.read_bytes == {"gets": 5, "range_gets": 0} and fs.written_bytes == {"puts": 5}

    # S3, on a real HTTP service that fails in each way, read fast and through boto3.
    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        cases = {
            f"http://127.0.0.1:{service.server_port}": {
                "503": "server_error",
                "403": "denied",
                "400": "rejected",
                "silent": "timeout",
            },
            f"http://127.0.0.1:{closed.getsockname()[1]}": {"-": "unavailable"},
        }
        try:
            for endpoint, kinds in cases.items():
                for mode, kind in kinds.items():
                    _Answering.mode = mode
                    for fast in (True, False):
                        s3 = CountingStore(
                            S3Store(
                                "b",
                                "p",
                                endpoint_url=endpoint,
                                max_attempts=1,
                                read_timeout=0.5,
                                access_key_id="k",
                                secret_access_key="s",
                                fast_reads=fast,
                            )
                        )
                        for call in (lambda: s3.get("k"), lambda: s3.put("k", b"x")):
                            with pytest.raises(StorageError):
                                call()
                        assert s3.errors == {("gets", kind): 1, ("puts", kind): 1}, (mode, fast)
                        assert s3.read_bytes["gets"] == s3.written_bytes["puts"] == 0
        finally:
            service.shutdown()
