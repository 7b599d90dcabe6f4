"""Prometheus metrics at GET /metrics and the access log, on a real server process."""

from __future__ import annotations

import subprocess
import sys

import apsw
import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

import graft_vfs
from support.clients import pragma
from support.servers import wait_until_listening


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
    cmd = [sys.executable, "-m", "graft_vfs.cli", "server", "--store", str(tmp_path / "store"),
           "--port", "0", "--access-log"]
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
