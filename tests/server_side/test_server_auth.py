"""Bearer tokens at the HTTP edge, in-process: the token file, 401/403, and that a
refused request reads and writes nothing (the store's call counters stay still)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap
from starlette.testclient import TestClient

from graft_server import auth
from graft_server.app import create_app
from graft_server.auth import TokenFile, create_token, hash_token, parse_tokens, revoke_token
from graft_server.objstore import MemoryStore
from graft_vfs.core.errors import InvalidRequest, Unauthorized
from graft_vfs.core.segment import encode_segment
from support.commits import commit_body, page

MSGPACK = {"content-type": "application/x-msgpack"}
MAX_BODY = 256 * 1024


# Every route but health, with the access it needs; vid is filled in per test.
ROUTES = [
    ("GET", "/v1/volumes/{vid}", None, "read"),
    ("POST", "/v1/volumes/{vid}/pull", {"since": 0}, "read"),
    ("POST", "/v1/volumes/{vid}/read", {"lsn": 1, "pages": BitMap([0]).serialize()}, "read"),
    ("GET", "/v1/volumes/{vid}/log/1", None, "read"),
    ("POST", "/v1/volumes/{vid}/commit", "commit", "write"),
    ("POST", "/v1/segments", "segment", "write"),
]


class Tokens(dict):
    """name -> token, plus the file they are in."""

    path: str


@pytest.fixture
def tokens(tmp_path) -> Tokens:
    path = str(tmp_path / "tokens.json")
    made = Tokens()
    made.path = path
    for name, globs, access in [
        ("orders-rw", ["orders*"], "write"),
        ("orders-ro", ["orders*"], "read"),
        ("logs-rw", ["logs"], "write"),
        ("both-ro", ["orders", "logs"], "read"),
    ]:
        made[name] = create_token(path, name, globs, access)
    return made


@pytest.fixture
def store() -> MemoryStore:
    """A store holding volumes 'orders' and 'logs' at LSN 1, written by an open server."""
    store = MemoryStore()
    with TestClient(create_app(store)) as open_client:
        for vid in ("orders", "logs"):
            r = open_client.post(
                f"/v1/volumes/{vid}/commit",
                content=msgpack.packb(commit_body(vid, 0, 1, {0: page(1)})),
                headers=MSGPACK,
            )
            assert r.status_code == 200
    return store


@pytest.fixture
def client(store: MemoryStore, tokens: Tokens) -> Iterator[TestClient]:
    app = create_app(store, max_body=MAX_BODY, tokens=TokenFile(tokens.path), cache_bytes=0)
    with TestClient(app) as c:
        yield c


def request(
    client: TestClient, method: str, path: str, body: Any, vid: str, token: str | None
) -> Any:
    headers = dict(MSGPACK)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if body == "commit":
        content = msgpack.packb(commit_body(vid, 1, 1, {0: page(2)}))
    elif body == "segment":
        content = encode_segment([(0, page(3))])[0]
        headers["content-type"] = "application/octet-stream"
    else:
        content = None if body is None else msgpack.packb(body)
    return client.request(method, path.format(vid=vid), content=content, headers=headers)


def contents(store: MemoryStore) -> dict[str, bytes | None]:
    return {key: store.get(key) for key in store.list("")}


def assert_no_secret(text: str, tokens: Tokens) -> None:
    for token in tokens.values():
        assert token not in text
        assert hash_token(token) not in text


@pytest.mark.parametrize("method, path, body, access", ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer graft_not-a-real-token", "Basic dXNlcjpwdw=="])
def test_without_a_valid_token_401_and_nothing_touched(
    client, store, method, path, body, access, header
) -> None:
    before, calls = contents(store), dict(store.stats)
    headers = dict(MSGPACK)
    if header is not None:
        headers["authorization"] = header
    r = client.request(method, path.format(vid="orders"), content=b"\x80", headers=headers)
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "not-a-real-token" not in r.text and "dXNlcjpwdw" not in r.text
    assert store.stats == calls, "a refused request reached the store"
    assert contents(store) == before


WRITES = [r for r in ROUTES if r[3] == "write" and "{vid}" in r[1]]
ON_VOLUME = [r for r in ROUTES if "{vid}" in r[1]]
SEGMENTS = [r for r in ROUTES if "{vid}" not in r[1]]
OUT_OF_SCOPE = [
    *[("orders-ro", "orders", *r) for r in WRITES],  # a read token
    *[("logs-rw", "orders", *r) for r in ON_VOLUME],  # another volume
    *[("orders-rw", "logs", *r) for r in ON_VOLUME],
    *[("both-ro", "other", *r) for r in ON_VOLUME],
    *[("orders-ro", None, *r) for r in SEGMENTS],  # an upload needs write somewhere
    *[("both-ro", None, *r) for r in SEGMENTS],
]


@pytest.mark.parametrize("name, vid, method, path, body, access", OUT_OF_SCOPE)
def test_outside_the_scope_403_and_nothing_touched(
    client, store, tokens, name, vid, method, path, body, access
) -> None:
    before, calls = contents(store), dict(store.stats)
    r = request(client, method, path, body, vid or "orders", tokens[name])
    assert (r.status_code, r.json()["error"]) == (403, "forbidden"), r.text
    message = r.json()["message"]
    assert repr(name) in message and access in message
    if vid is not None:
        assert repr(vid) in message
    assert_no_secret(r.text, tokens)
    assert store.stats == calls, "a refused request reached the store"
    assert contents(store) == before


@pytest.mark.parametrize(
    "name, reader, vid",
    [
        ("orders-rw", "orders-ro", "orders"),
        ("orders-rw", "orders-ro", "orders-2024"),
        ("logs-rw", "both-ro", "logs"),
    ],
)
def test_in_scope_requests_work(client, tokens, name, reader, vid) -> None:
    if vid not in ("orders", "logs"):  # a volume the glob matches, created now
        headers = {**MSGPACK, "authorization": f"Bearer {tokens[name]}"}
        body = msgpack.packb(commit_body(vid, 0, 1, {0: page(1)}))
        assert client.post(f"/v1/volumes/{vid}/commit", content=body, headers=headers).is_success
    for method, path, body, _ in ROUTES:
        r = request(client, method, path, body, vid, tokens[name])
        assert r.status_code == 200, (method, path, r.text)
    r = request(client, "POST", "/v1/volumes/{vid}/pull", {"since": 0}, vid, tokens[reader])
    assert msgpack.unpackb(r.content)["lsn"] == 2


def test_commit_checks_its_own_volume_not_the_segments(client, store, tokens) -> None:
    """A segment uploaded with a token for 'logs' cannot be committed into 'orders'."""
    headers = {"authorization": f"Bearer {tokens['logs-rw']}"}
    seg = encode_segment([(0, page(9))])[0]
    r = client.post("/v1/segments", content=seg, headers=headers)
    assert r.status_code == 200
    body = commit_body("orders", 1, 1, {0: page(9)})
    del body["segment"]
    body["segments"] = [msgpack.unpackb(r.content)["sid"]]
    r = client.post("/v1/volumes/orders/commit", content=msgpack.packb(body), headers=headers)
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    assert store.list("volumes/orders/log/") == ["volumes/orders/log/" + "1".zfill(20)]


def test_volume_list_shows_only_readable_volumes(client, tokens) -> None:
    def listed(name: str) -> list[str]:
        r = client.get("/v1/volumes", headers={"authorization": f"Bearer {tokens[name]}"})
        return sorted(v["vid"] for v in r.json()["volumes"])

    assert listed("orders-ro") == ["orders"]
    assert listed("logs-rw") == ["logs"]
    assert listed("both-ro") == ["logs", "orders"]
    assert client.get("/v1/volumes").status_code == 401


def test_health_stays_open(client) -> None:
    assert client.get("/v1/health").json()["ok"] is True


def test_auth_is_checked_before_the_body_is_read(client, store, tokens) -> None:
    """An unauthenticated client cannot make the server buffer (or refuse) a big body."""
    before, calls = contents(store), dict(store.stats)
    r = client.post("/v1/segments", content=b"\x00" * (MAX_BODY + 1))
    assert r.status_code == 401  # not 413: the body was never looked at
    reader = {"authorization": f"Bearer {tokens['orders-ro']}"}
    r = client.post("/v1/segments", content=b"\x00" * (MAX_BODY + 1), headers=reader)
    assert r.status_code == 403
    assert store.stats == calls and contents(store) == before


def test_no_tokens_file_means_an_open_server(store) -> None:
    with TestClient(create_app(store)) as c:
        assert c.get("/v1/volumes/orders").status_code == 200


def test_an_empty_token_file_refuses_everything(store, tmp_path) -> None:
    path = tmp_path / "none.json"
    path.write_text('{"tokens": []}')
    with TestClient(create_app(store, tokens=TokenFile(path))) as c:
        assert c.get("/v1/volumes/orders").status_code == 401
        assert c.get("/v1/health").status_code == 200


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    secret=st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=",
        min_size=16,
        max_size=80,
    ),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", ""]),
)
def test_any_other_token_is_a_401_that_never_repeats_it(client, secret, scheme) -> None:
    header = f"{scheme} {secret}".strip()
    r = client.get("/v1/volumes/orders", headers={"authorization": header})
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    assert secret not in r.text


# --- the token file -----------------------------------------------------------------


def test_hashed_at_rest_with_owner_only_permissions(tokens) -> None:
    text = open(tokens.path).read()
    for token in tokens.values():
        assert token not in text and hash_token(token) in text
        assert token.startswith("graft_") and len(token) >= 40
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600
    entries = json.loads(text)["tokens"]
    assert [e["name"] for e in entries] == list(tokens)
    assert entries[3]["volumes"] == ["orders", "logs"] and entries[0]["volumes"] == ["orders*"]


def test_edits_keep_the_file_mode_and_refuse_duplicate_names(tokens) -> None:
    os.chmod(tokens.path, 0o640)
    create_token(tokens.path, "another", ["x"], "read")
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o640
    with pytest.raises(InvalidRequest, match="already exists"):
        create_token(tokens.path, "another", ["y"], "write")
    revoke_token(tokens.path, "another")
    with pytest.raises(InvalidRequest, match="no token named"):
        revoke_token(tokens.path, "another")


def test_globs_match_the_whole_volume_id_case_sensitively() -> None:
    (token,) = parse_tokens(
        json.dumps(
            {"tokens": [{"name": "t", "sha256": "0" * 64, "volumes": "app-*", "access": "write"}]}
        ),
        "t.json",
    )
    assert token.allows("write", "app-1") and token.allows("read", "app-")
    assert not token.allows("read", "App-1") and not token.allows("read", "my-app-1")


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("not json", "not valid JSON"),
        ("[]", '{"tokens": [...]}'),
        ('{"tokens": [1]}', "not a JSON object"),
        ('{"tokens": [{"name": "a b"}]}', "'name'"),
        ('{"tokens": [{"name": "a", "sha256": "XYZ"}]}', "'sha256'"),
        (
            '{"tokens": [{"name": "a", "sha256": "' + "a" * 64 + '", "volumes": []}]}',
            "'volumes'",
        ),
        (
            '{"tokens": [{"name": "a", "sha256": "'
            + "a" * 64
            + '", "volumes": "*", "access": "admin"}]}',
            "'access'",
        ),
    ],
)
def test_a_bad_token_file_says_what_is_wrong(tmp_path, text, complaint) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidRequest) as info:
        TokenFile(path)
    assert complaint in str(info.value) and str(path) in str(info.value)
    assert "XYZ" not in str(info.value) and "a" * 64 not in str(info.value)


def test_changes_to_the_file_apply_without_a_restart(tokens, monkeypatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_INTERVAL", 0.0)
    file = TokenFile(tokens.path)
    header = f"Bearer {tokens['logs-rw']}"
    assert file.authenticate(header).name == "logs-rw"
    revoke_token(tokens.path, "logs-rw")
    with pytest.raises(Unauthorized):
        file.authenticate(header)
    new = create_token(tokens.path, "late", ["*"], "read")
    assert file.authenticate(f"Bearer {new}").name == "late"
    # A broken file keeps the last good set in force (and is logged, once).
    with open(tokens.path, "w") as f:
        f.write("{ half-written")
    time.sleep(0.01)
    assert file.authenticate(f"Bearer {new}").name == "late"


def test_python_m_server_takes_a_token_file(tokens, tmp_path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graft_server",
            "--store",
            str(tmp_path / "s"),
            "--port",
            "0",
            "--tokens",
            tokens.path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("graft server listening on "), line
        url = line.split()[-1]
        http = urllib3.PoolManager(retries=False)
        assert http.request("GET", url + "/v1/volumes").status == 401
        headers = {"Authorization": f"Bearer {tokens['both-ro']}"}
        assert http.request("GET", url + "/v1/volumes", headers=headers).json() == {"volumes": []}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()


def test_a_damaged_volume_fails_no_listing_and_stays_hidden_out_of_scope(
    client, store, tokens
) -> None:
    store.put("volumes/logs/log/" + "1".zfill(20), b"damaged")

    def listing(name: str) -> Any:
        return client.get("/v1/volumes", headers={"authorization": f"Bearer {tokens[name]}"})

    r = listing("orders-ro")
    assert r.status_code == 200
    assert r.json() == {"volumes": [{"vid": "orders", "lsn": 1, "page_count": 1}]}
    r = listing("both-ro")
    assert r.status_code == 200
    logs, orders = r.json()["volumes"]  # by name
    assert orders == {"vid": "orders", "lsn": 1, "page_count": 1}
    assert (logs["vid"], logs["error"]) == ("logs", "corrupt_data") and logs["message"]
