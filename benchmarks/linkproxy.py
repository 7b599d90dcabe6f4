"""A simulated network link: an asyncio TCP proxy on 127.0.0.1 that delays and caps.

Each proxy listens on a loopback port and forwards to one target port. A *request* is
a burst of bytes the client sends after the server has answered (HTTP/1.1 without
pipelining: one request per burst); each request is held for the link's ``delay``
before it is forwarded, and the first one on a new connection for twice that (the
TCP handshake's round trip). Bytes in each direction are paced by a token bucket
shared by all connections of the proxy, so parallel connections share the link's
bandwidth as they would on a real one. Everything crossing the proxy is counted:
requests (by HTTP method), bytes up, bytes down, connections, and time:

- ``delay_seconds``: the link's delay the requests were held for, summed;
- ``pacing_seconds``: the time bytes waited for the link's bandwidth, summed;
- ``busy_seconds``: each request's time from its first byte up to the last byte of its
  answer, summed over requests (request-seconds: parallel requests add up);
- ``busy_wall_seconds``: the wall time during which at least one request was in flight
  (the union of those intervals), and ``busy_periods``: how many separate periods that
  union has (round trips: requests in flight together count once).

Run as a process, it is driven by JSON lines on stdin, one answer per line on stdout::

    {"op": "add", "name": "s3", "target": 8333}            -> {"port": 41234}
    {"op": "link", "name": "s3", "delay": 0.02, "bandwidth": 100e6}
    {"op": "target", "name": "s3", "target": 8334}
    {"op": "stats", "name": "s3"}                           -> {"requests": ..., ...}
    {"op": "reset", "name": "s3"}
    {"op": "quit"}

A separate process keeps the proxy's Python work off the measured client's GIL.
``ProxyProcess`` is the harness's handle on it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

READ_SIZE = 256 * 1024
WINDOW = 16  # chunks read ahead of the paced writer (up to 4 MiB)
MAX_INTERVALS = 1_000_000  # request intervals kept for busy_wall_seconds (then merged)
METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ")


@dataclass(frozen=True)
class Link:
    """A link profile: added delay per request (seconds), bandwidth (bytes/s, None: no cap)."""

    name: str
    delay: float = 0.0
    bandwidth: float | None = None

    def describe(self) -> str:
        if not self.delay and not self.bandwidth:
            return "loopback (no added delay, no cap)"
        bw = f"{self.bandwidth / 1e6:g} MB/s" if self.bandwidth else "no cap"
        return f"+{self.delay * 1000:g} ms per request, {bw}"


LOOPBACK = Link("loopback")
EDGE = Link("edge", 0.020, 100e6)
SLOW = Link("slow", 0.050, 2e6)
PROFILES = {link.name: link for link in (LOOPBACK, EDGE, SLOW)}


class _Bucket:
    """Paces one direction of a link: the time at which it is free again.

    A chunk starts once the link has sent the ones before it, occupies it for
    ``n / bandwidth`` seconds and is delivered at the end of that. Oversleeping (timer
    granularity, a busy CPU) is made up for within SLACK, so the average rate
    holds at the cap instead of falling below it.
    """

    SLACK = 0.005

    def __init__(self) -> None:
        self.free_at = 0.0

    async def send(self, n: int, bandwidth: float | None) -> float:
        """Wait until ``n`` bytes are through the link; returns the seconds waited."""
        if not bandwidth:
            return 0.0
        now = asyncio.get_running_loop().time()
        start = max(now - self.SLACK, self.free_at)
        self.free_at = start + n / bandwidth
        wait = self.free_at - now  # delivered once wholly sent
        if wait > 0.0005:
            await asyncio.sleep(wait)
            return wait
        return 0.0


class Proxy:
    """One listening port forwarding to ``127.0.0.1:target`` through a ``Link``."""

    def __init__(self, name: str, target: int, link: Link = LOOPBACK) -> None:
        self.name = name
        self.target = target
        self.link = link
        self.server: asyncio.base_events.Server | None = None
        self._up = _Bucket()
        self._down = _Bucket()
        self.states: dict[int, dict] = {}  # each open connection's state, by id
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.methods: Counter[str] = Counter()
        self.method_bytes: Counter[str] = Counter()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.delay_seconds = 0.0
        self.pacing_seconds = 0.0
        self.intervals: list[tuple[float, float]] = []  # (first byte up, last byte down)
        for state in self.states.values():  # a request in flight now is not counted
            state["req_start"] = None

    def _close_request(self, state: dict) -> None:
        """Record the request open on a connection (if any) as one interval."""
        start, end = state.get("req_start"), state.get("last_down")
        state["req_start"] = None
        if start is not None and end is not None and end > start:
            self.intervals.append((start, end))
            if len(self.intervals) > MAX_INTERVALS:
                self.intervals = _merge(self.intervals)

    def stats(self) -> dict:
        intervals = list(self.intervals)
        for state in self.states.values():  # requests still open: up to their last byte
            start, end = state.get("req_start"), state.get("last_down")
            if start is not None and end is not None and end > start:
                intervals.append((start, end))
        merged = _merge(intervals)
        return {
            "requests": self.requests,
            "methods": dict(self.methods),
            "method_bytes_up": dict(self.method_bytes),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections": self.connections,
            "delay_seconds": self.delay_seconds,
            "pacing_seconds": self.pacing_seconds,
            "busy_seconds": sum(end - start for start, end in intervals),
            "busy_wall_seconds": sum(end - start for start, end in merged),
            # round trips: periods with requests in flight, parallel ones counted once
            "busy_periods": len(merged),
        }

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cwriter.close()
            return
        state: dict = {"new_request": True, "first": True, "method": ""}
        self.states[id(state)] = state
        up = asyncio.ensure_future(self._pipe(creader, swriter, state, self._up, upstream=True))
        down = asyncio.ensure_future(
            self._pipe(sreader, cwriter, state, self._down, upstream=False)
        )
        try:
            done, _ = await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            if down not in done:  # the client is done sending: let the answer finish
                await asyncio.wait([down], timeout=5.0)
        except asyncio.CancelledError:  # the proxy is shutting down
            pass
        finally:
            self._close_request(state)
            self.states.pop(id(state), None)
            for task in (up, down):
                task.cancel()
            for w in (cwriter, swriter):
                try:
                    w.close()
                except Exception:
                    pass

    async def _pipe(self, reader, writer, state, bucket: _Bucket, *, upstream: bool) -> None:
        """Forward one direction: reading runs ahead of the paced writing (a window of
        WINDOW chunks, like TCP's), so the link's pacing and the sender overlap."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=WINDOW)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    await queue.put(None)
                    return
                release = 0.0
                if upstream:
                    if state["new_request"]:
                        state["new_request"] = False
                        if data.startswith(METHODS):  # else the body after "100 Continue"
                            method = data.split(b" ", 1)[0].decode()
                            state["method"] = method
                            self.requests += 1
                            self.methods[method] += 1
                            self._close_request(state)
                            state["req_start"] = time.monotonic()
                            state["last_down"] = None
                        delay = self.link.delay * (2 if state["first"] else 1)
                        state["first"] = False
                        release = loop.time() + delay
                    self.bytes_up += len(data)
                    self.method_bytes[state["method"]] += len(data)
                else:
                    state["new_request"] = True
                    self.bytes_down += len(data)
                await queue.put((data, release))

        reading = asyncio.ensure_future(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    if upstream and writer.can_write_eof():
                        writer.write_eof()
                    return
                data, release = item
                if release:
                    wait = release - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                        self.delay_seconds += wait
                self.pacing_seconds += await bucket.send(len(data), self.link.bandwidth)
                writer.write(data)
                await writer.drain()
                if not upstream:
                    state["last_down"] = time.monotonic()
        finally:
            reading.cancel()


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``intervals`` as disjoint intervals, in order."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


async def _serve_commands() -> None:
    proxies: dict[str, Proxy] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            return
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                answer({"ok": True})
                return
            if op == "add":
                proxy = Proxy(cmd["name"], int(cmd["target"]))
                proxies[cmd["name"]] = proxy
                answer({"port": await proxy.start()})
                continue
            proxy = proxies[cmd["name"]]
            if op == "link":
                proxy.link = Link(cmd.get("label", "custom"), cmd["delay"], cmd["bandwidth"])
                answer({"ok": True})
            elif op == "target":
                proxy.target = int(cmd["target"])
                answer({"ok": True})
            elif op == "stats":
                answer(proxy.stats())
            elif op == "reset":
                proxy.reset()
                answer({"ok": True})
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception as exc:  # a bad command is answered, never fatal
            answer({"error": f"{type(exc).__name__}: {exc}"})


class ProxyProcess:
    """The harness's handle on a ``python -m benchmarks.linkproxy`` child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.linkproxy"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _call(self, **cmd) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"link proxy exited with {self.proc.wait()}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"link proxy: {out['error']}")
        return out

    def add(self, name: str, target: int) -> int:
        """Start a proxy named ``name`` in front of ``127.0.0.1:target``; returns its port."""
        return int(self._call(op="add", name=name, target=target)["port"])

    def set_link(self, name: str, link: Link) -> None:
        self._call(
            op="link", name=name, label=link.name, delay=link.delay, bandwidth=link.bandwidth
        )

    def set_target(self, name: str, target: int) -> None:
        self._call(op="target", name=name, target=target)

    def stats(self, name: str) -> dict:
        return self._call(op="stats", name=name)

    def reset(self, name: str) -> None:
        self._call(op="reset", name=name)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call(op="quit")
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)


if __name__ == "__main__":
    asyncio.run(_serve_commands())
