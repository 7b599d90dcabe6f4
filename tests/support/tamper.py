"""A real HTTP proxy in front of a graft server that rewrites its answers, for tests only.

Every request is forwarded unchanged to the server; the answer to each page read
(``POST /v1/volumes/{vid}/read``), and the pages of an opening (``GET
/v1/volumes/{vid}?open=N``), is decoded and passed to ``rewrite`` with a way to ask
the server for other pages, so a test can play a server that answers with damaged or
misplaced frames. Nothing in the client is mocked: it talks HTTP to this proxy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgpack
import urllib3

from graft_vfs.core.graft import encode_graft

# (the decoded read answer, its path, a reader of other pages at the same LSN) -> answer
Fetch = Callable[[list[int]], list[list[Any]]]
Rewrite = Callable[[dict[str, Any], str, Fetch], dict[str, Any]]


class TamperingProxy:
    """``url`` forwards to ``upstream``; read answers go through ``rewrite`` when set."""

    def __init__(self, upstream: str, rewrite: Rewrite | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.rewrite = rewrite
        self.rewritten = 0
        self.paths: list[str] = []  # every request's method and path, in order
        self._http = urllib3.PoolManager(maxsize=8)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                proxy.paths.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("authorization", "content-type", "range")
                }
                resp = proxy._http.request(
                    self.command, proxy.upstream + self.path, body=body, headers=headers
                )
                data = resp.data
                reads = (self.command == "POST" and self.path.endswith("/read")) or (
                    self.command == "GET" and "?open=" in self.path
                )
                if proxy.rewrite is not None and resp.status == 200 and reads:
                    data = proxy._rewritten(self.path, body or b"", data, headers)
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.headers.get("Content-Type", ""))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _rewritten(self, path: str, request: bytes, data: bytes, headers: dict) -> bytes:
        answer = msgpack.unpackb(data)
        if request:  # a read: its LSN is in the request
            lsn, read_path = msgpack.unpackb(request)["lsn"], path
        else:  # an opening (GET .../VOLUME?open=N): its LSN is the answer's
            lsn, read_path = answer["lsn"], path.split("?")[0] + "/read"

        def fetch(pages: list[int]) -> list[list[Any]]:
            body = {"lsn": lsn, "pages": encode_graft(pages)}
            resp = self._http.request(
                "POST", self.upstream + read_path, body=msgpack.packb(body), headers=headers
            )
            assert resp.status == 200, resp.data
            rows: list[list[Any]] = msgpack.unpackb(resp.data)["pages"]
            return rows

        assert self.rewrite is not None
        self.rewritten += 1
        return msgpack.packb(self.rewrite(answer, path, fetch))

    def __enter__(self) -> TamperingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.clear()
