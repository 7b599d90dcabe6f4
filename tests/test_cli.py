"""The graft command line, run as a real process against a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import apsw
import pytest

from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import VolumeNotFound
from graft_vfs.sample import make_sample_database
from support.clients import graft
from support.servers import CLIENT_SIDE_STORES

# The CLI/client side on the directory store in `make test`, on every kind in `make soak`
# (tests/support/servers.py, CLIENT_SIDE_STORES).
pytestmark = pytest.mark.stores(*CLIENT_SIDE_STORES)


def pages_of(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    pages = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    # the change counter fields are served from the LSN, not stored
    pages[0] = pages[0][:24] + pages[0][28:92] + pages[0][96:]
    return pages


def test_import_export_roundtrip(server, vid, tmp_path):
    src = make_sample_database(str(tmp_path / "app.db"), orders=20_000)
    out = graft("import", src, vid, "--remote", server.url)
    assert json.loads(out.stdout)["lsn"] == 1
    dst = str(tmp_path / "out.db")
    graft("export", vid, dst, "--remote", server.url)
    assert pages_of(dst) == pages_of(src)
    con = apsw.Connection(dst)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT count(*) FROM orders").fetchone() == (20_000,)
    con.close()
    again = graft("import", src, vid, "--remote", server.url, check=False)
    assert again.returncode == 1 and "--replace" in again.stderr
    exists = graft("export", vid, dst, "--remote", server.url, check=False)
    assert exists.returncode == 1 and "--force" in exists.stderr


def _make(path: str, page_size: int, journal_mode: str) -> str:
    con = apsw.Connection(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute(f"PRAGMA journal_mode={journal_mode}").fetchall()
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    con.close()
    return path


@pytest.mark.parametrize(
    "page_size, journal_mode, advice",
    [(1024, "delete", "VACUUM INTO"), (4096, "wal", "journal_mode=DELETE")],
)
def test_import_refuses_unsupported_files_and_writes_nothing(
    server, vid, tmp_path, page_size, journal_mode, advice
):
    src = _make(str(tmp_path / "bad.db"), page_size, journal_mode)
    proc = graft("import", src, vid, "--remote", server.url, check=False)
    assert proc.returncode == 1 and advice in proc.stderr
    with pytest.raises(VolumeNotFound):
        Remote(server.url).snapshot(vid)


def test_import_refuses_non_sqlite_and_bad_names(server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello " * 100)
    proc = graft("import", str(notes), "notes", "--remote", server.url, check=False)
    assert proc.returncode == 1 and "not a SQLite database" in proc.stderr
    src = _make(str(tmp_path / "ok.db"), 4096, "delete")
    proc = graft("import", src, "../escape", "--remote", server.url, check=False)
    assert proc.returncode == 1 and "invalid volume name" in proc.stderr


def test_sql_status_and_sync_commands(server, vid, tmp_path):
    writer = str(tmp_path / "writer")
    graft(
        "sql",
        vid,
        "CREATE TABLE t(k, v); INSERT INTO t VALUES('a', 1), ('b', x'00ff')",
        "--remote",
        server.url,
        "--cache",
        writer,
        "--create",
    )
    pushed = Remote(server.url).snapshot(vid).lsn
    written = json.loads(graft("status", vid, "--cache", writer).stdout)
    assert (written["pending_push"], written["remote_lsn"]) == (0, pushed)  # before it exited
    assert pushed > 0
    reader = str(tmp_path / "reader")
    out = graft(
        "sql",
        vid,
        "SELECT k, v FROM t ORDER BY k",
        "--json",
        "--remote",
        server.url,
        "--cache",
        reader,
    )
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"k": "a", "v": 1},
        {"k": "b", "v": "00ff"},
    ]
    plain = graft("sql", vid, "SELECT k, v FROM t WHERE k = 'a'", "--cache", reader)
    assert plain.stdout.strip() == "a|1"
    status = json.loads(graft("status", vid, "--cache", reader).stdout)
    assert status["volume"] == vid and status["remote_lsn"] == pushed and not status["diverged"]
    graft("sql", vid, "INSERT INTO t VALUES('c', 3)", "--remote", server.url, "--cache", writer)
    pulled = json.loads(graft("pull", vid, "--remote", server.url, "--cache", reader).stdout)
    assert pulled["pulled"] and pulled["remote_lsn"] == pushed + 1
    bad = graft("sql", vid, "SELECT nope FROM t", "--cache", reader, check=False)
    assert bad.returncode == 1 and "no such column" in bad.stderr
    hydrated = json.loads(graft("hydrate", vid, "--remote", server.url, "--cache", reader).stdout)
    # The reader's pull left only the table's page (the one 'c' changed) to fetch.
    assert (hydrated["page_count"], hydrated["pages_fetched"]) == (2, 1)
    again = json.loads(graft("hydrate", vid, "--remote", server.url, "--cache", reader).stdout)
    assert (again["page_count"], again["pages_fetched"]) == (2, 0)
    volumes = json.loads(graft("volumes", "--remote", server.url).stdout)
    assert vid in {v["volume"] for v in volumes}


def test_the_client_installs_without_the_servers_dependencies():
    """`pip install graft-vfs` is the client: the server's libraries come with [server]."""
    from importlib.metadata import requires

    from graft_vfs.cli import SERVER_DEPENDENCIES

    def names(extra: str | None) -> set[str]:
        wanted = f'extra == "{extra}"' if extra else None
        return {
            re.split(r"[<>=;\[ ]", r, maxsplit=1)[0]
            for r in requires("graft-vfs") or []
            if (wanted in r if wanted else "extra ==" not in r)
        }

    plain, server = names(None), names("server")
    assert plain and not plain & {"boto3", "starlette", "uvicorn", "uvloop", "httptools"}
    assert {"boto3", "starlette", "uvicorn"} <= server
    assert set(SERVER_DEPENDENCIES) >= {"boto3", "starlette", "uvicorn"}


def test_server_commands_without_the_server_extra_say_what_to_install(tmp_path):
    """The client alone still imports; `graft server` then names the extra, in one line."""
    code = (
        "import sys\n"
        "for name in ('starlette', 'uvicorn', 'boto3', 'botocore'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "import graft_vfs, graft_vfs.client.api\n"
        "from graft_vfs.cli import main\n"
        f"main(['server', '--store', {str(tmp_path / 's')!r}, '--port', '0'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pip install 'graft-vfs[server]'" in proc.stderr
