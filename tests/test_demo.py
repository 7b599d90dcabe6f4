"""`make demo` runs end to end: a server, a lazily read replica, and a `graft replica`."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_demo_runs_and_queries_a_graft_replica_over_http():
    out = subprocess.run(
        [sys.executable, "-m", "graft_vfs.demo"], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("total: ") for line in lines)
    at = lines.index("graft replica, queried over plain HTTP:")
    assert lines[at + 1].strip().startswith("GET http://127.0.0.1:")
    answer = json.loads(lines[at + 2])
    assert answer["volume"] == "orders" and answer["lsn"] == 1
    assert answer["columns"] == ["orders", "total"] and answer["rows"][0][0] > 0
