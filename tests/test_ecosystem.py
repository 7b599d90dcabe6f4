"""The tools people reach for: VACUUM INTO a volume, export to stdout, python -m graft_vfs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import apsw
import pytest

import graft_vfs
from support.clients import graft
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)


def plain_database(path: str, rows: int = 5000, page_size: int = 4096) -> None:
    con = apsw.Connection(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("CREATE TABLE t(x INTEGER PRIMARY KEY, y TEXT); CREATE INDEX ty ON t(y)")
    with con:
        con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}" * 5) for i in range(rows)])
    con.close()


def vacuum_into(source: str, vid: str, vfs: str) -> None:
    """As upstream Graft recommends: the source opened with URI names enabled."""
    con = apsw.Connection(source, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    try:
        con.execute(f"VACUUM INTO 'file:{vid}?vfs={vfs}'")
    finally:
        con.close()


def test_vacuum_into_a_volume_is_an_import(server, vid, tmp_path):
    source = str(tmp_path / "plain.db")
    plain_database(source)
    name = f"graft-import-{vid}"
    runtime = graft_vfs.register(
        server.url, str(tmp_path / "writer"), name=name, options=graft_vfs.Options(autopush=False)
    )
    try:
        vacuum_into(source, vid, name)
        vol = runtime.volume(vid, create=False)
        assert vol.status()["pending_push"] == 1  # one local commit
        assert vol.sync.push()["remote_lsn"] == 1
        # A volume that exists (here, on the server) is never overwritten.
        with pytest.raises(apsw.SQLError, match="output file already exists"):
            vacuum_into(source, vid, name)
        small = str(tmp_path / "small.db")
        plain_database(small, rows=10, page_size=1024)
        with pytest.raises(apsw.SQLError, match="page size 1024 .* 4096-byte pages"):
            vacuum_into(small, vid + "-small", name)
    finally:
        graft_vfs.unregister(name)

    fresh = graft_vfs.connect(vid, remote=server.url, cache_dir=str(tmp_path / "reader"))
    try:
        assert fresh.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        got = fresh.execute("SELECT count(*), sum(x), max(y) FROM t").fetchall()
    finally:
        fresh.close()
    native = apsw.Connection(source)
    assert got == native.execute("SELECT count(*), sum(x), max(y) FROM t").fetchall()
    native.close()


def test_export_to_stdout(server, vid, tmp_path):
    source = str(tmp_path / "plain.db")
    plain_database(source, rows=2000)
    graft("import", source, vid, "--remote", server.url)
    graft(
        "sql",
        vid,
        "DELETE FROM t WHERE x >= 1000",
        "--remote",
        server.url,
        "--cache",
        str(tmp_path / "c"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    for lsn, count in ((["--lsn", "1"], 2000), ([], 1000)):
        proc = subprocess.run(
            [sys.executable, "-m", "graft_vfs", "export", vid, "-", "--remote", server.url, *lsn],
            capture_output=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
        path = tmp_path / f"out{count}.db"
        path.write_bytes(proc.stdout)  # nothing but the database on stdout
        con = apsw.Connection(str(path))
        assert con.execute("SELECT count(*) FROM t").fetchall() == [(count,)]
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        con.close()


def test_python_m_graft_vfs_is_graft():
    proc = subprocess.run(
        [sys.executable, "-m", "graft_vfs", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: graft ")
    for command in ("shell", "export", "sql", "server"):
        assert f"  {command} " in proc.stdout


def test_readme_vacuum_into_example_runs(server, vid, tmp_path):
    """README's VACUUM INTO example, run as written (server, cache, file and name swapped)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = readme.split("python - <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    source = str(tmp_path / "app.db")
    plain_database(source, rows=300)
    code = code.replace("http://127.0.0.1:3000", server.url)
    code = code.replace("/tmp/graft-cache", str(tmp_path / "cache"))
    code = code.replace('"app.db"', repr(source)).replace("file:orders?", f"file:{vid}?")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["remote_lsn"] == 1
    fresh = graft_vfs.connect(vid, remote=server.url, cache_dir=str(tmp_path / "reader"))
    try:
        assert fresh.execute("SELECT count(*) FROM t").fetchall() == [(300,)]
    finally:
        fresh.close()
