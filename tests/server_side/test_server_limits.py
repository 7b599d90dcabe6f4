"""Bounded memory and time per client, on a real server process: zstd bombs, oversized
segments, slow and idle connections, bodies that never arrive.

Memory is read from the server's /proc/PID/status (VmHWM: the most it ever held), so a
test sees what one request cost the process, not the test's own allocations.
"""

from __future__ import annotations

import json
import select
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import msgpack
import pytest
import urllib3
import zstandard

from graft_vfs.core import segment
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.segment import encode_frames
from support.commits import call, commit_body, page
from support.frames import zstd_bomb
from support.servers import running_server

MIB = 1 << 20
# What a refused request may add to the server's peak memory: its body and change. The
# refusals below cost 1 GiB or more without the checks.
REFUSAL_BUDGET = 100 * MIB
SLOW_CONNECTIONS = 600  # more than the server's open-file limit in the test below
CLIENT_TIMEOUT = 30.0  # graft_vfs.Options' default HTTP timeout


def peak_memory(pid: int) -> int:
    """The most memory the process ever held, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def post(url: str, path: str, body: bytes, msgpack_body: bool = False) -> tuple[int, dict]:
    kind = "application/x-msgpack" if msgpack_body else "application/octet-stream"
    r = urllib3.PoolManager().request(
        "POST",
        url + path,
        body=body,
        headers={"content-type": kind},
        retries=False,
        timeout=CLIENT_TIMEOUT,
    )
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.status, r.json()
    return r.status, msgpack.unpackb(r.data)


def inline_commit(vid: str, seg: bytes, page_count: int = 1) -> bytes:
    return msgpack.packb(
        {"base": 0, "page_count": page_count, "hash": b"h" * 32, "segment": seg}
    )


def test_zstd_bombs_are_refused_before_they_are_decompressed(own_server) -> None:
    """A 32 KiB frame declaring 1 GiB is a 400 and costs the server no memory."""
    srv = own_server.start()
    bomb = zstd_bomb(1 << 30)
    seg = encode_frames([(0, bomb)])[0]
    before = peak_memory(srv.proc.pid)
    status, upload = post(srv.url, "/v1/segments", seg)
    status2, commit = post(srv.url, "/v1/volumes/bomb/commit", inline_commit("bomb", seg), True)
    assert (status, status2) == (400, 400)
    assert peak_memory(srv.proc.pid) - before < REFUSAL_BUDGET
    assert upload["error"] == commit["error"] == "invalid_request"
    assert "declares 1073741824 bytes" in upload["message"]
    assert srv.objects("segments/") == [] and srv.objects("volumes/") == []


def test_a_segment_of_more_pages_than_a_client_sends_is_refused_unread(
    own_server, monkeypatch
) -> None:
    """65,536 zero pages (2.3 MB) cost about 300 MB and seconds of CPU to decode: 400 first."""
    srv = own_server.start()
    frame = zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE))
    monkeypatch.setattr(segment, "MAX_SEGMENT_PAGES", 1 << 20)  # write one anyway
    seg = encode_frames([(p, frame) for p in range(65_536)])[0]
    monkeypatch.undo()
    before = peak_memory(srv.proc.pid)
    status, upload = post(srv.url, "/v1/segments", seg)
    commit_body = inline_commit("big", seg, 65_536)
    status2, commit = post(srv.url, "/v1/volumes/big/commit", commit_body, True)
    assert peak_memory(srv.proc.pid) - before < REFUSAL_BUDGET
    assert (status, status2) == (400, 400)
    assert upload["error"] == commit["error"] == "invalid_request"
    assert srv.objects("segments/") == [] and srv.objects("volumes/") == []


def test_page_numbers_beyond_range_and_bytes_after_a_frame_are_400s(own_server) -> None:
    srv = own_server.start()
    frame = zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE))
    bad = {
        "page 2^32": encode_frames([(1 << 32, frame)])[0],
        "trailing byte": encode_frames([(0, frame + b"\0")])[0],
        "two frames": encode_frames([(0, frame + frame)])[0],
    }
    for why, seg in bad.items():
        status, body = post(srv.url, "/v1/segments", seg)
        assert (status, body["error"]) == (400, "invalid_request"), why
        status, body = post(srv.url, "/v1/volumes/v/commit", inline_commit("v", seg), True)
        assert (status, body["error"]) == (400, "invalid_request"), why
    assert srv.objects("segments/") == [] and srv.objects("volumes/") == []


def slow_connection(url: str) -> socket.socket:
    """A connection that starts a request and never finishes its headers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: graft\r\nX-Slow: ")
    return sock


def commit_one_page(url: str, vid: str) -> None:
    body = commit_body(vid, 0, 1, {0: page(7)})
    status, answer = call("POST", f"{url}/v1/volumes/{vid}/commit", body)
    assert (status, answer["lsn"]) == (200, 1)


def test_slow_connections_never_lock_out_a_request(tmp_path: Path) -> None:
    """600 connections that never finish their headers, against a server allowed 384 open
    files: an ordinary request still gets its answer (it used to get a reset)."""
    with running_server(tmp_path / "store", open_files=384) as (_, url), ExitStack() as held:
        commit_one_page(url, "v")
        for _ in range(SLOW_CONNECTIONS):
            held.enter_context(slow_connection(url))
        for _ in range(3):
            r = urllib3.PoolManager().request(
                "GET", f"{url}/v1/volumes/v", retries=False, timeout=CLIENT_TIMEOUT
            )
            assert r.status == 200 and msgpack.unpackb(r.data)["lsn"] == 1


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP answer's head and body, read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-answer after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return head, body


def closed_by_peer(sock: socket.socket) -> bool:
    poller = select.poll()  # not select.select: descriptors may be past FD_SETSIZE
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False  # nothing to read: still open
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def eventually(check, timeout: float = CLIENT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_past_max_connections_the_longest_waiting_connection_makes_room(tmp_path) -> None:
    args = ["--max-connections", "50", "--header-timeout", "600"]
    with running_server(tmp_path / "store", args=args) as (_, url), ExitStack() as held:
        slow = [held.enter_context(slow_connection(url)) for _ in range(200)]
        r = urllib3.PoolManager().request("GET", f"{url}/v1/health", retries=False, timeout=10)
        assert r.status == 200
        # The first 150 made room for the later ones; the last ones are still open.
        assert eventually(lambda: all(closed_by_peer(s) for s in slow[:150]))
        assert not any(closed_by_peer(s) for s in slow[-10:])


def test_headers_must_arrive_within_the_header_timeout(tmp_path: Path) -> None:
    args = ["--header-timeout", "0.5"]
    with running_server(tmp_path / "store", args=args) as (_, url), ExitStack() as held:
        first = held.enter_context(slow_connection(url))
        assert eventually(lambda: closed_by_peer(first))
        # The deadline starts again after each answer on a kept-alive connection.
        host, port = url.removeprefix("http://").rsplit(":", 1)
        again = held.enter_context(socket.create_connection((host, int(port)), timeout=10))
        again.sendall(b"GET /v1/health HTTP/1.1\r\nHost: graft\r\n\r\n")
        assert read_answer(again)[0].startswith(b"HTTP/1.1 200")
        again.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gr")
        assert eventually(lambda: closed_by_peer(again))


def test_a_body_that_does_not_arrive_in_time_is_a_408(tmp_path: Path) -> None:
    args = ["--body-timeout", "0.5"]
    with running_server(tmp_path / "store", args=args) as (_, url), ExitStack() as held:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = held.enter_context(socket.create_connection((host, int(port)), timeout=10))
        sock.sendall(
            b"POST /v1/segments HTTP/1.1\r\nHost: graft\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
        )
        head, body = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 408")
        assert json.loads(body)["error"] == "request_timeout"
        assert eventually(lambda: closed_by_peer(sock))


def test_a_client_refuses_a_bomb_in_a_read_answer(own_server) -> None:
    """A store written behind the server's back (a bomb with valid checksums): the server
    serves frames unread, and the client refuses the frame before decompressing it."""
    from graft_vfs.client.remote import Remote
    from graft_vfs.core.commit import CommitRecord, SegmentRef
    from graft_vfs.core.errors import CorruptData
    from graft_vfs.core.ids import new_identity, new_segment_id

    srv = own_server.start()
    seg, entries = encode_frames([(0, zstd_bomb(1 << 30))])
    sid = new_segment_id()
    srv.write_object(f"segments/{sid}", seg)
    record = CommitRecord(
        "bombed", new_identity(), 1, 1, b"h" * 32, time.time(), [SegmentRef(sid, entries)]
    )
    srv.write_object("volumes/bombed/log/" + "1".zfill(20), record.encode())
    with pytest.raises(CorruptData, match="declares 1073741824 bytes"):
        Remote(srv.url).read_pages("bombed", 1, [0])


def test_headers_over_the_limit_are_refused(tmp_path: Path) -> None:
    with running_server(tmp_path / "store") as (proc, url), ExitStack() as held:
        before = peak_memory(proc.pid)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = held.enter_context(socket.create_connection((host, int(port)), timeout=10))
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: graft\r\n")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(64 * 1024):  # 64 MiB of headers at most; refused after 64 KiB
                sock.sendall(b"X-Pad: " + b"x" * 1015 + b"\r\n")
        assert peak_memory(proc.pid) - before < REFUSAL_BUDGET


def test_connections_trickling_a_body_cannot_hold_every_slot(tmp_path: Path) -> None:
    args = ["--max-connections", "20", "--body-timeout", "600"]
    with running_server(tmp_path / "store", args=args) as (_, url), ExitStack() as held:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        trickling = []
        for _ in range(60):
            sock = held.enter_context(socket.create_connection((host, int(port)), timeout=10))
            sock.sendall(
                b"POST /v1/segments HTTP/1.1\r\nHost: graft\r\nContent-Length: 1000\r\n\r\nxx"
            )
            trickling.append(sock)
        r = urllib3.PoolManager().request("GET", f"{url}/v1/health", retries=False, timeout=10)
        assert r.status == 200
        assert eventually(lambda: all(closed_by_peer(s) for s in trickling[:40]))
