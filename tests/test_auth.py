"""Bearer tokens end to end: a real ``graft server --tokens FILE`` process, the Python
client, and the command line; refused requests change nothing and no secret leaks."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import apsw
import pytest
import urllib3

import graft_vfs
from graft_server.auth import hash_token
from graft_vfs.client.remote import Remote
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import Forbidden, Unauthorized
from graft_vfs.core.protocol import MAX_INLINE_PAGES
from graft_vfs.sample import make_sample_database
from support.auth import SCOPES, WRONG, Secured, create_tokens
from support.clients import graft
from support.servers import ServerProcess


def assert_no_secret(text: str, secured: Secured) -> None:
    for secret in secured.secrets():
        assert secret not in text


def test_the_token_file_holds_only_hashes(secured: Secured) -> None:
    text = open(secured.path).read()
    for token in secured.tokens.values():
        assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(os.stat(secured.path).st_mode) == 0o600
    listed = [
        json.loads(line)
        for line in graft("token", "list", "--file", secured.path).stdout.splitlines()
    ]
    assert [(e["name"], e["volumes"], e["access"]) for e in listed] == [
        (name, [glob], access) for name, glob, access in SCOPES
    ]
    assert all("sha256" not in e for e in listed)


def test_without_a_valid_token_401(secured: Secured) -> None:
    with pytest.raises(Unauthorized, match="requires a bearer token.*GRAFT_TOKEN"):
        Remote(secured.url).snapshot("app-x")
    with pytest.raises(Unauthorized, match="not valid on this server") as info:
        Remote(secured.url, token=WRONG).list_volumes()
    assert_no_secret(str(info.value), secured)
    http = urllib3.PoolManager()
    r = http.request("GET", secured.url + "/v1/volumes/app-x", retries=False)
    assert r.status == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert http.request("GET", secured.url + "/v1/health").json()["ok"] is True


def test_a_read_token_cannot_commit_and_nothing_is_written(secured: Secured) -> None:
    writer = Remote(secured.url, token=secured.tokens["rw"])
    reader = Remote(secured.url, token=secured.tokens["ro"])
    page = b"\x01" * 4096
    writer.commit("app-ro", 0, 1, {0: page}, commit_hash("app-ro", 0, 1, [(0, page)]))
    before = secured.objects()
    with pytest.raises(Forbidden) as small:
        reader.commit("app-ro", 1, 1, {0: b"\x02" * 4096}, b"i" * 32)
    big = {i: i.to_bytes(4, "big") * 1024 for i in range(MAX_INLINE_PAGES + 1)}
    with pytest.raises(Forbidden) as segments:  # refused at the first segment upload
        reader.commit("app-ro", 1, len(big), big, b"j" * 32)
    assert secured.objects() == before
    assert "token 'ro' (read access to volumes 'app-*') may not write volume 'app-ro'" in str(
        small.value
    )
    assert "may not upload segments" in str(segments.value)
    assert_no_secret(f"{small.value} {segments.value}", secured)
    assert reader.read_pages("app-ro", 1, [0])[0][1] == page  # reading is in scope


def test_a_token_for_other_volumes_gets_403_and_reads_nothing(secured: Secured) -> None:
    writer = Remote(secured.url, token=secured.tokens["rw"])
    first = {0: b"\x05" * 4096}
    writer.commit("app-other", 0, 1, first, commit_hash("app-other", 0, 1, first.items()))
    before = secured.objects()
    other = Remote(secured.url, token=secured.tokens["other"])
    for call in (
        lambda: other.snapshot("app-other"),
        lambda: other.pull("app-other", 0),
        lambda: other.read_pages("app-other", 1, [0]),
        lambda: other.log_entry("app-other", 1),
        lambda: other.commit("app-other", 1, 1, {0: b"\x06" * 4096}, b"l" * 32),
    ):
        with pytest.raises(Forbidden, match="token 'other'.*volume 'app-other'") as info:
            call()
        assert b"\x05" * 64 not in str(info.value).encode()
        assert_no_secret(str(info.value), secured)
    assert secured.objects() == before
    assert [v["vid"] for v in other.list_volumes()] == []
    assert "app-other" in [v["vid"] for v in writer.list_volumes()]


def test_connect_with_a_token_end_to_end(secured: Secured, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("GRAFT_TOKEN", raising=False)
    made = []

    def connect(cache: str, **kwargs) -> apsw.Connection:
        con = graft_vfs.connect(
            "app-e2e", remote=secured.url, cache_dir=str(tmp_path / cache), **kwargs
        )
        made.append(con)
        return con

    try:
        rw = graft_vfs.Options(token=secured.tokens["rw"], autopush=False)
        writer = connect("w", options=rw)
        writer.execute("CREATE TABLE t(x); INSERT INTO t VALUES ('hello')")
        pushed = json.loads(writer.execute("PRAGMA graft_push").fetchone()[0])
        assert (pushed["pushed"], pushed["remote_lsn"]) == (True, 1)
        monkeypatch.setenv("GRAFT_TOKEN", secured.tokens["ro"])
        reader = connect("r", options=graft_vfs.Options(autopush=False))  # token from env
        assert reader.execute("SELECT x FROM t").fetchall() == [("hello",)]
        reader.execute("INSERT INTO t VALUES ('local only')")  # durable locally
        with pytest.raises(apsw.AuthError, match="token 'ro'.*may not write volume 'app-e2e'"):
            reader.execute("PRAGMA graft_push").fetchall()
        monkeypatch.delenv("GRAFT_TOKEN")
        with pytest.raises(apsw.AuthError, match="requires a bearer token") as info:
            connect("none")
        assert_no_secret(str(info.value), secured)
    finally:
        for con in made:
            con.close()
        # "none" was registered, then failed
        for name, vfs in list(graft_vfs.client.api._registered.items()):
            if vfs.runtime.cache_dir.startswith(str(tmp_path)):
                graft_vfs.unregister(name)


def test_a_refused_push_is_reported_not_retried(secured: Secured, tmp_path) -> None:
    """Retrying cannot help a token outside its scope: status says why, flush gives up."""
    src = make_sample_database(str(tmp_path / "bg.db"), orders=10)
    graft("import", src, "app-bg", "--remote", secured.url, token=secured.tokens["rw"])
    con = graft_vfs.connect(
        "app-bg",
        remote=secured.url,
        cache_dir=str(tmp_path / "bg"),
        options=graft_vfs.Options(token=secured.tokens["ro"]),
    )
    try:
        con.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")  # pushed in the background

        def status() -> dict:
            return json.loads(con.execute("PRAGMA graft_status").fetchone()[0])

        assert eventually(lambda: "Forbidden" in (status()["last_error"] or ""))
        assert "may not write volume 'app-bg'" in status()["last_error"]
        assert status()["pending_push"] == 2  # CREATE and INSERT, still local
        runtime = graft_vfs.runtime_of(con.open_vfs)
        assert runtime.remote is not None
        call, answers = runtime.remote._call, []

        def recorded(method, path, *args, **kwargs):
            try:
                return call(method, path, *args, **kwargs)
            except Exception as exc:
                # flush's own calls (the CREATE's and the INSERT's commits each woke the
                # background sync, which may still push the second time meanwhile)
                if threading.current_thread() is threading.main_thread():
                    answers.append(type(exc).__name__)
                raise

        runtime.remote._call = recorded  # type: ignore[method-assign]
        assert runtime.flush(timeout=60) is False
        assert answers == ["Forbidden"]  # gave up at the first refusal: nothing retried
    finally:
        con.close()
        graft_vfs.unregister(con.open_vfs)


def test_the_command_line_with_a_token(secured: Secured, tmp_path) -> None:
    url, rw, ro = secured.url, secured.tokens["rw"], secured.tokens["ro"]
    src = make_sample_database(str(tmp_path / "app.db"), orders=500)
    outputs = [graft("import", src, "app-cli", "--remote", url, "--token", rw)]
    outputs.append(graft("export", "app-cli", str(tmp_path / "out.db"), "--remote", url, token=ro))
    listed = graft("volumes", "--remote", url, token=ro)
    assert "app-cli" in [v["volume"] for v in json.loads(listed.stdout)]
    assert json.loads(graft("volumes", "--remote", url, token=secured.tokens["other"]).stdout) == []
    cache = ["--remote", url, "--cache", str(tmp_path / "cache")]
    sql = graft("sql", "app-cli", "SELECT count(*) FROM orders", *cache, token=ro)
    assert sql.stdout.strip() == "500"
    outputs += [listed, sql]
    for command in ("hydrate", "status", "pull", "push", "reset"):
        outputs.append(graft(command, "app-cli", *cache, "--token", rw))
    refused = [
        graft(
            "sql", "app-cli", "SELECT 1", *cache[:2], "--cache", str(tmp_path / "c2"), check=False
        ),
        graft("import", src, "app-cli", "--remote", url, "--replace", token=ro, check=False),
        graft(
            "export",
            "app-cli",
            str(tmp_path / "x.db"),
            "--remote",
            url,
            "--token",
            WRONG,
            check=False,
        ),
    ]
    assert [p.returncode for p in refused] == [1, 1, 1]
    assert "requires a bearer token" in refused[0].stderr and "GRAFT_TOKEN" in refused[0].stderr
    assert "token 'ro'" in refused[1].stderr and "may not write" in refused[1].stderr
    assert "not valid on this server" in refused[2].stderr
    for p in [*outputs, *refused]:
        assert "Traceback" not in p.stderr
        assert_no_secret(p.stdout + p.stderr, secured)


def test_revoking_applies_to_a_running_server(secured: Secured) -> None:
    token = graft(
        "token",
        "create",
        "--name",
        "temp",
        "--volumes",
        "*",
        "--access",
        "read",
        "--file",
        secured.path,
    ).stdout.strip()
    remote = Remote(secured.url, token=token, retries=0)
    # Until the server has read the new file, the new token is unknown to it.
    listed = eventually(lambda: remote.list_volumes() is not None, expected=Unauthorized)
    assert remote.health() and listed
    graft("token", "revoke", "--name", "temp", "--file", secured.path)
    assert eventually(lambda: raises(Unauthorized, remote.list_volumes))
    assert "temp" not in open(secured.path).read()


def eventually(check, timeout: float = 10.0, expected=()) -> bool:
    """Whether ``check()`` becomes true (or stops raising ``expected``) within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except expected:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def raises(exc: type[Exception], fn) -> bool:
    try:
        fn()
    except exc:
        return True
    return False


def test_no_secret_in_server_logs_at_debug_level(tmp_path, capfd) -> None:
    path = str(tmp_path / "tokens.json")
    tokens = create_tokens(path)
    args = ["--tokens", path, "--log-level", "debug", "--access-log"]
    srv = ServerProcess(str(tmp_path / "store"), args=args)
    secured = Secured(srv.start(), tokens, path)
    try:
        first = {0: b"\x07" * 4096}
        Remote(srv.url, token=tokens["rw"]).commit(
            "app-log", 0, 1, first, commit_hash("app-log", 0, 1, first.items())
        )
        refusals = [(None, Unauthorized), (WRONG, Unauthorized)]
        refusals += [(tokens["other"], Forbidden), (tokens["ro"], Forbidden)]
        for token, refusal in refusals:
            with pytest.raises(refusal):
                Remote(srv.url, token=token).commit("app-log", 1, 1, {0: b"\x08" * 4096}, b"n" * 32)
        http = urllib3.PoolManager()
        http.request("GET", srv.url + "/v1/volumes", headers={"Authorization": WRONG})
    finally:
        srv.stop()
    assert srv.proc is not None and srv.proc.stdout is not None
    out = srv.proc.stdout.read() + capfd.readouterr().err
    assert "denied POST '/v1/volumes/app-log/commit'" in out
    assert "token 'other'" in out and "token 'ro'" in out
    assert '"POST /v1/volumes/app-log/commit HTTP/1.1" 403' in out  # the access log too
    assert_no_secret(out, secured)


@pytest.mark.parametrize("with_tokens", [False, True])
def test_warns_when_open_beyond_loopback(tmp_path, capfd, with_tokens: bool) -> None:
    args = ["--host", "0.0.0.0"]
    if with_tokens:
        path = tmp_path / "tokens.json"
        path.write_text('{"tokens": []}')
        args += ["--tokens", str(path)]
    srv = ServerProcess(str(tmp_path / "store"), args=args).start()
    srv.stop()
    err = capfd.readouterr().err
    assert ("without tokens" in err) is not with_tokens
    assert ("has no tokens" in err) is with_tokens
