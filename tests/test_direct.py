"""Direct reads: clients GET page frames from S3 with presigned URLs the server hands out.

Everything runs against a SeaweedFS started with S3 identities (``signed_seaweed``), so
the store checks every signature: the suite's shared SeaweedFS accepts anonymous
requests and would let any URL through.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import urllib3

import graft_vfs
from graft_vfs.client import direct as direct_module
from graft_vfs.client.remote import Remote, Traffic
from graft_vfs.core.errors import CorruptData, Forbidden, RemoteError
from graft_vfs.core.graft import encode_graft
from support.auth import create_tokens
from support.s3 import SeaweedFS, s3_env
from support.servers import ServerProcess
from support.tamper import TamperingProxy

ROWS = 3000  # rows of ~300 bytes: a table of a few hundred pages


@pytest.fixture
def start_server(signed_seaweed: SeaweedFS) -> Iterator[Any]:
    """Start graft servers on the signed SeaweedFS (one prefix each), stopped afterwards."""
    started: list[ServerProcess] = []

    def start(*args: str, prefix: str | None = None) -> ServerProcess:
        prefix = prefix or signed_seaweed.new_prefix()
        srv = ServerProcess(
            signed_seaweed.spec(prefix),
            env=s3_env(),
            kind="s3",
            s3_endpoint=signed_seaweed.endpoint,
            backing=signed_seaweed.store(prefix),
            args=list(args) if "--no-direct" in args else ["--direct", *args],
        )
        started.append(srv.start())
        return srv

    yield start
    for srv in started:
        srv.stop()


def fill(url: str, vid: str, cache: str, token: str | None = None) -> list[tuple]:
    """A volume ``vid`` with a table of ROWS rows, pushed; returns its rows."""
    options = graft_vfs.Options(autopush=False, token=token)
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache, options=options)
    try:
        con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
        with con:  # one local commit, not ROWS (the push squashes them into one anyway)
            con.executemany(
                "INSERT INTO t VALUES(?, ?)", ((k, f"{k:08d}" + "x" * 290) for k in range(ROWS))
            )
        con.execute("CREATE INDEX t_v ON t(v)")  # 300-byte keys: an index of 3+ levels
        json.loads(con.execute("PRAGMA graft_push").fetchone()[0])
        return con.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    finally:
        con.close()
        graft_vfs.unregister(con.open_vfs)


def locate(url: str, vid: str, lsn: int, pages: list[int], token: str | None = None) -> Any:
    headers = {"Content-Type": "application/x-msgpack"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = msgpack.packb({"lsn": lsn, "pages": encode_graft(pages)})
    resp = urllib3.request("POST", f"{url}/v1/volumes/{vid}/locate", body=body, headers=headers)
    if resp.status != 200:
        return resp.status, json.loads(resp.data)
    return resp.status, msgpack.unpackb(resp.data)


def index_root(url: str, vid: str, cache: str) -> int:
    """The 0-based root page of index t_v."""
    con = graft_vfs.connect(vid, remote=url, cache_dir=cache)
    try:
        rootpage = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 't_v'")
        return int(rootpage.fetchone()[0]) - 1
    finally:
        con.close()
        graft_vfs.unregister(con.open_vfs)


def test_direct_reads_return_what_the_server_path_returns(start_server, tmp_path) -> None:
    srv = start_server()
    vid = f"v-{uuid.uuid4().hex[:12]}"
    fill(srv.url, vid, str(tmp_path / "w"))
    root = index_root(srv.url, vid, str(tmp_path / "w"))
    assert urllib3.request("GET", srv.url + "/v1/health").json()["direct"] is True
    with TamperingProxy(srv.url) as proxy:
        remote = Remote(proxy.url)
        head = remote.snapshot(vid)
        assert remote.direct_offered
        pages = list(range(head.page_count))
        traffic = Traffic()
        got = remote.read_pages(vid, head.lsn, pages, traffic)
        # One locate for the whole (small) snapshot, no /read: frames came from S3.
        assert [p.split()[1].rsplit("/", 1)[1] for p in proxy.paths] == [vid, "locate"]
        assert traffic.requests >= 2
        again = remote.read_pages(vid, head.lsn, [0, root], None, expand=64)
        assert len(proxy.paths) == 2  # the map is kept: no server hop at all
    server_path = Remote(srv.url, direct=False)
    assert server_path.read_pages(vid, head.lsn, pages) == got
    # Client-side expansion sends the interior pages the server would, whatever the budget.
    assert server_path.read_pages(vid, head.lsn, [0, root], expand=64) == again
    assert len(again) > 3  # the root's children and theirs: two levels below it
    for budget in (1, 2, 5, 1024):
        assert remote.read_pages(vid, head.lsn, [root], expand=budget) == (
            server_path.read_pages(vid, head.lsn, [root], expand=budget)
        ), budget


def test_sql_through_the_vfs_with_direct_reads(start_server, tmp_path) -> None:
    srv = start_server()
    vid = f"v-{uuid.uuid4().hex[:12]}"
    writer_cache = str(tmp_path / "w")
    expected = fill(srv.url, vid, writer_cache)
    with TamperingProxy(srv.url) as proxy:
        con = graft_vfs.connect(vid, remote=proxy.url, cache_dir=str(tmp_path / "r"))
        try:
            assert con.execute("SELECT k, v FROM t WHERE k = 1234").fetchall() == [expected[1234]]
            assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == expected
            assert not any(p.endswith("/read") for p in proxy.paths)
            # Another client changes rows; after a pull, the reader must see the new
            # pages, never a location of the snapshot before.
            w = graft_vfs.connect(vid, remote=srv.url, cache_dir=writer_cache)
            w.execute("UPDATE t SET v = 'changed' WHERE k % 100 = 7")
            json.loads(w.execute("PRAGMA graft_push").fetchone()[0])
            w.close()
            json.loads(con.execute("PRAGMA graft_pull").fetchone()[0])
            changed = [(k, "changed" if k % 100 == 7 else v) for k, v in expected]
            assert con.execute("SELECT k, v FROM t ORDER BY k").fetchall() == changed
            assert not any(p.endswith("/read") for p in proxy.paths)
        finally:
            con.close()
            graft_vfs.unregister(con.open_vfs)


def test_presigned_urls_allow_one_get_of_one_object(start_server, tmp_path) -> None:
    srv = start_server()
    vid = f"v-{uuid.uuid4().hex[:12]}"
    fill(srv.url, vid, str(tmp_path / "w"))
    status, answer = locate(srv.url, vid, 1, [0, 1])
    assert status == 200 and len(answer["segments"]) == 1
    sid, url = answer["segments"][0]
    http = urllib3.PoolManager()
    ok = http.request("GET", url, headers={"Range": "bytes=0-7"})
    assert (ok.status, ok.data) == (206, b"GRFTSEG2")
    assert "X-Amz-Signature=" in url  # SigV4
    signature = url.split("X-Amz-Signature=")[1][:64]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    other_key = url.replace(sid, sid[:-1] + ("a" if sid[-1] != "a" else "b"))
    log_key = url.replace(f"segments/{sid}", f"volumes/{vid}/log/{1:020d}")
    assert http.request("GET", tampered).status == 403
    assert http.request("GET", other_key).status == 403
    assert http.request("GET", log_key).status == 403
    assert http.request("PUT", url, body=b"x").status == 403
    assert http.request("DELETE", url).status == 403
    assert http.request("GET", url.split("?")[0]).status == 403  # unsigned
    assert srv.read_object(f"segments/{sid}")[:8] == b"GRFTSEG2"  # nothing was changed


def test_expired_urls_are_refused_and_replaced_once(start_server, tmp_path, monkeypatch) -> None:
    srv = start_server("--direct-expiry", "1")
    vid = f"v-{uuid.uuid4().hex[:12]}"
    fill(srv.url, vid, str(tmp_path / "w"))
    status, answer = locate(srv.url, vid, 1, [0])
    assert answer["expires_in"] == 1
    with TamperingProxy(srv.url) as proxy:
        remote = Remote(proxy.url)
        head = remote.snapshot(vid)
        # Keep the locations past their URLs' validity, so the store sees them expired.
        monkeypatch.setattr(direct_module, "EXPIRY_MARGIN", 100.0)
        first = remote.read_pages(vid, head.lsn, [1])
        time.sleep(2.5)
        assert urllib3.request("GET", answer["segments"][0][1]).status == 403  # expired
        again = remote.read_pages(vid, head.lsn, [1, 2])
        # Counted at once: the fresh URLs are valid for 1 s too, and a later read (on a
        # loaded machine) could find them expired in turn.
        locates = [p for p in proxy.paths if p.endswith("/locate")]
        assert len(locates) == 2  # the first map, then fresh URLs once
        assert again == Remote(srv.url, direct=False).read_pages(vid, head.lsn, [1, 2])
        assert first[1] == again[1]
        assert not any(p.endswith("/read") for p in proxy.paths)


def test_urls_the_store_keeps_refusing_are_a_clear_error(start_server, tmp_path) -> None:
    """A server signing for an address that is not the store's (here: a proxy that
    rewrites the Host header the signature covers): refused twice, one clear error."""
    with TamperingProxy("http://127.0.0.1:1") as store_proxy:
        srv = start_server("--direct-endpoint", store_proxy.url)
        store_proxy.upstream = srv.s3_endpoint or ""
        vid = f"v-{uuid.uuid4().hex[:12]}"
        fill(srv.url, vid, str(tmp_path / "w"))
        remote = Remote(srv.url)
        head = remote.snapshot(vid)
        with pytest.raises(RemoteError, match="refused the presigned URLs.*--no-direct"):
            remote.read_pages(vid, head.lsn, [1])
        assert len([p for p in store_proxy.paths if p.startswith("GET")]) == 2
    # Turned off on the server, the same store is read through the server.
    off = start_server("--no-direct", prefix=srv.store.rsplit("/", 1)[1])
    assert urllib3.request("GET", off.url + "/v1/health").json()["direct"] is False
    remote = Remote(off.url)
    assert len(remote.read_pages(vid, remote.snapshot(vid).lsn, [1, 2])) == 2
    assert not remote.direct_offered
    assert locate(off.url, vid, 1, [0])[0] == 400


def test_the_server_signs_only_for_volumes_the_token_reads(start_server, tmp_path) -> None:
    path = str(tmp_path / "tokens.json")
    tokens = create_tokens(path)
    srv = start_server("--tokens", path)
    mine, theirs = f"app-{uuid.uuid4().hex[:8]}", f"else-{uuid.uuid4().hex[:8]}"
    fill(srv.url, mine, str(tmp_path / "a"), token=tokens["rw"])
    fill(srv.url, theirs, str(tmp_path / "b"), token=tokens["other"])
    assert locate(srv.url, mine, 1, [0], token=tokens["ro"])[0] == 200
    status, body = locate(srv.url, theirs, 1, [0], token=tokens["ro"])
    assert (status, body["error"]) == (403, "forbidden")
    assert locate(srv.url, theirs, 1, [0])[0] == 401
    remote = Remote(srv.url, token=tokens["ro"])
    with pytest.raises(Forbidden):
        remote.read_pages(theirs, 1, [0])
    assert len(remote.read_pages(mine, remote.snapshot(mine).lsn, [0, 1])) == 2


def test_a_segment_gone_from_the_store_is_read_through_the_server(start_server, tmp_path) -> None:
    """A 404 (GC deleted a compacted segment) sends the read to the server, which knows
    the volume's current map; here the segment is simply gone, so the server says so."""
    srv = start_server()
    vid = f"v-{uuid.uuid4().hex[:12]}"
    fill(srv.url, vid, str(tmp_path / "w"))
    with TamperingProxy(srv.url) as proxy:
        remote = Remote(proxy.url)
        head = remote.snapshot(vid)
        remote.read_pages(vid, head.lsn, [0])
        sid = locate(srv.url, vid, head.lsn, [1])[1]["segments"][0][0]
        srv.backing.delete(f"segments/{sid}")  # type: ignore[union-attr]
        with pytest.raises(CorruptData, match=f"segment {sid} is missing"):
            remote.read_pages(vid, head.lsn, [1])
        assert proxy.paths[-1] == f"POST /v1/volumes/{vid}/read"


def test_a_damaged_frame_in_the_store_never_leaves_the_client(start_server, tmp_path) -> None:
    """Direct reads check every frame themselves: the server never sees these bytes."""
    srv = start_server()
    vid = f"v-{uuid.uuid4().hex[:12]}"
    fill(srv.url, vid, str(tmp_path / "w"))
    answer = locate(srv.url, vid, 1, [3])[1]
    sid, offset, length = answer["segments"][0][0], answer["cols"][2][0], answer["cols"][3][0]
    key = f"segments/{sid}"
    data = bytearray(srv.read_object(key) or b"")
    data[offset + length // 2] ^= 0x20
    srv.write_object(key, bytes(data))
    with TamperingProxy(srv.url) as proxy:
        remote = Remote(proxy.url)
        head = remote.snapshot(vid)
        with pytest.raises(CorruptData, match="checksum mismatch for page 3$"):
            remote.read_pages(vid, head.lsn, [3])
        assert not any(p.endswith("/read") for p in proxy.paths)


def test_the_coalescing_gap_is_what_half_a_round_trip_moves():
    from graft_vfs.client.direct import COALESCE_GAP, MAX_GAP, gap_for
    from graft_vfs.client.link import Link

    assert gap_for(None) == COALESCE_GAP
    assert gap_for(Link(rtt=0.020, bandwidth=100e6)) == 1_000_000  # edge
    assert gap_for(Link(rtt=0.050, bandwidth=2e6)) == COALESCE_GAP  # slow: 50 KB < 64 KiB
    assert gap_for(Link(rtt=0.1, bandwidth=1e9)) == MAX_GAP
