"""Shared fixtures: a real graft server process on a loopback port, clients, volume names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import graft_vfs

STARTUP_TIMEOUT = 30.0


@dataclass
class ServerProcess:
    """A ``graft server`` child process on 127.0.0.1, stopped by PID."""

    store: str
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # extra `graft server` options
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, **extra_env: str) -> ServerProcess:
        env = {**os.environ, **self.env, **extra_env}
        if "GRAFT_CRASH_AT" not in extra_env:
            env.pop("GRAFT_CRASH_AT", None)
        cmd = [sys.executable, "-m", "graft_vfs.cli", "server", "--store", self.store]
        cmd += ["--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"graft server exited with {self.proc.wait()}")
            if "listening on http://" in line:
                self.port = int(line.rsplit(":", 1)[1])
                return self
        raise RuntimeError("graft server did not start in time")

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


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server shared by the session (tests use distinct volume names)."""
    srv = ServerProcess(str(tmp_path_factory.mktemp("store"))).start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path) -> Iterator[ServerProcess]:
    """A server of the test's own, for tests that kill or restart it."""
    srv = ServerProcess(str(tmp_path / "own-store"))
    yield srv
    srv.stop()


@pytest.fixture
def vid() -> str:
    return f"v-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(tmp_path, server):
    """A factory of independent clients: each call gets its own cache directory."""
    made: list = []

    def make(volume: str, *, cache: str | None = None, remote: str | None = None, **kwargs):
        cache_dir = cache or str(tmp_path / f"cache{len(made)}")
        con = graft_vfs.connect(volume, remote=remote or server.url, cache_dir=cache_dir, **kwargs)
        made.append(con)
        return con

    yield make
    names = {con.open_vfs for con in made}
    for con in made:
        con.close()
    for name in names:
        graft_vfs.unregister(name)
