"""Real ``graft server`` processes on loopback ports, and the wait for them to listen.

Used by the tests' fixtures (tests/conftest.py) and by the benchmarks.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from graft_server.objstore import FsStore, ObjectStore
from graft_server.serve import LISTENING

from .s3 import SeaweedFS, s3_env

STARTUP_TIMEOUT = 30.0
STORE_KINDS = ("fs", "s3")
# The store kinds of the modules that test what the client side does with a server's
# answers (the CLI, the shell, `graft replica`, SQLite's features through the VFS, the
# local cache, pins): a server on S3 answers them byte for byte as one on a directory
# does (no direct reads unless it is started with --direct), so `make test` runs them on
# the directory store only, and `make soak` (GRAFT_ALL_STORES=1) on every kind. The
# stores themselves stay proven on both kinds in `make test` by the server-side, model,
# bank, GC, crash, fork, replication, identity, trees and Volume API tests.
ALL_STORES = os.environ.get("GRAFT_ALL_STORES", "") not in ("", "0")
CLIENT_SIDE_STORES = STORE_KINDS if ALL_STORES else ("fs",)


@dataclass
class ServerProcess:
    """A ``graft server`` child process on 127.0.0.1, stopped by PID."""

    store: str
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # extra `graft server` options
    proc: subprocess.Popen | None = None
    kind: str = "fs"  # "fs": store is a directory; "s3": store is s3://bucket/prefix
    s3_endpoint: str | None = None
    backing: ObjectStore | None = None  # the tests' own view of the store

    def _backing(self) -> ObjectStore:
        if self.backing is None:
            self.backing = FsStore(self.store)
        return self.backing

    def objects(self, prefix: str = "") -> list[str]:
        """The keys in the server's store that start with ``prefix``, sorted."""
        return self._backing().list(prefix)

    def read_object(self, key: str) -> bytes | None:
        return self._backing().get(key)

    def write_object(self, key: str, data: bytes) -> None:
        """Replace an object behind the server's back (to corrupt or repair it)."""
        self._backing().put(key, data)

    def wipe(self) -> None:
        """Delete every object in the store (stop the server first: it caches what it read)."""
        store = self._backing()
        for key in store.list(""):
            store.delete(key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (a subclass may run another program)."""
        cmd = [sys.executable, "-m", "graft_vfs.cli", "server", "--store", self.store]
        cmd += ["--port", str(self.port), *self.args]
        if self.s3_endpoint:
            cmd += ["--s3-endpoint", self.s3_endpoint]
        return cmd

    def start(self, **extra_env: str) -> ServerProcess:
        env = {**os.environ, **self.env, **extra_env}
        if "GRAFT_CRASH_AT" not in extra_env:
            env.pop("GRAFT_CRASH_AT", None)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, text=True, env=env)
        url = wait_until_listening(self.proc, STARTUP_TIMEOUT)
        self.port = int(url.rsplit(":", 1)[1])
        return self

    def kill(self) -> int:
        """SIGKILL the process and return its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_all(servers: Sequence[ServerProcess]) -> list[ServerProcess]:
    """Start ``servers`` at once (each waits for its own listening line; a second each,
    in parallel instead of in turn); if one fails, stop those that started and raise."""
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        futures = [pool.submit(srv.start) for srv in servers]
        errors = [f.exception() for f in futures]
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        for srv in servers:
            srv.stop()
        raise failed
    return list(servers)


def new_server_process(request: pytest.FixtureRequest, kind: str, directory) -> ServerProcess:
    """A (not yet started) server on a fresh store of ``kind``: a directory or an S3 prefix."""
    if kind == "fs":
        return ServerProcess(str(directory))
    seaweed: SeaweedFS = request.getfixturevalue("seaweed")
    prefix = seaweed.new_prefix()
    return ServerProcess(
        seaweed.spec(prefix),
        env=s3_env(),
        kind="s3",
        s3_endpoint=seaweed.endpoint,
        backing=seaweed.store(prefix),
    )


def wait_until_listening(proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> str:
    """The URL a started ``graft server`` process (stdout piped, text) listens on.

    Raises RuntimeError if it exits or prints no listening line within ``timeout``.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"graft server exited with {proc.wait()}")
        if line.startswith(LISTENING):
            return line[len(LISTENING) :].strip()
    raise RuntimeError(f"graft server did not start within {timeout} s")


@contextmanager
def running_server(
    store: Path | str,
    crash_at: str | None = None,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    open_files: int | None = None,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m graft_server --port 0`` on ``store``: wait for its listening line, stop it
    by PID. ``open_files`` runs it under ``ulimit -n open_files``."""
    env = {**os.environ, **(env or {})}
    env.pop("GRAFT_CRASH_AT", None)
    if crash_at:
        env["GRAFT_CRASH_AT"] = crash_at

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc = subprocess.Popen(
        [sys.executable, "-m", "graft_server", "--store", str(store), "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=limit,
    )
    try:
        yield proc, wait_until_listening(proc, STARTUP_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
