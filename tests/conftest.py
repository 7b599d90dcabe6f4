"""Shared fixtures: a real graft server process on a loopback port, clients, volume names.

The end-to-end suite runs on every store kind selected with ``--stores`` (default
``fs,s3``): the session ``server`` is parametrized over them, and ``own_server``
uses the same kind as ``server``. S3 is a real SeaweedFS started once per session
(tests/s3.py); each server gets its own key prefix in one shared bucket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from s3 import SeaweedFS, s3_env

import graft_vfs
from server.app import wait_until_listening
from server.objstore import FsStore, ObjectStore

STARTUP_TIMEOUT = 30.0
STORE_KINDS = ("fs", "s3")


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


@pytest.fixture(scope="session", params=STORE_KINDS)
def server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[ServerProcess]:
    """One real server per store kind, shared by the session (tests use distinct volumes)."""
    srv = new_server_process(request, request.param, tmp_path_factory.mktemp("store")).start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(request: pytest.FixtureRequest, tmp_path, server) -> Iterator[ServerProcess]:
    """A server of the test's own on ``server``'s kind of store, to kill or restart it."""
    srv = new_server_process(request, server.kind, tmp_path / "own-store")
    yield srv
    srv.stop()


@pytest.fixture
def vid() -> str:
    return f"v-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def connect():
    """graft_vfs.connect, with every client it made closed and unregistered afterwards."""
    made: list = []

    def make(*args, **kwargs):
        made.append(graft_vfs.connect(*args, **kwargs))
        return made[-1]

    yield make
    names = {con.open_vfs for con in made}
    for con in made:
        con.close()
    for name in names:
        graft_vfs.unregister(name)


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stores",
        default=",".join(STORE_KINDS),
        help=f"comma-separated store kinds the end-to-end tests run on ({', '.join(STORE_KINDS)})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stores(*kinds): run only on these store kinds")
    unknown = set(selected_stores(config)) - set(STORE_KINDS)
    if unknown:
        raise pytest.UsageError(f"--stores: unknown kinds {sorted(unknown)}; use {STORE_KINDS}")


def selected_stores(config: pytest.Config) -> list[str]:
    return [kind.strip() for kind in config.getoption("--stores").split(",") if kind.strip()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests on store kinds not selected, or not allowed by a stores mark."""
    selected = selected_stores(config)
    keep, drop = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        kinds = {params[name] for name in ("server", "store") if params.get(name) in STORE_KINDS}
        mark = item.get_closest_marker("stores")
        allowed = {k for k in selected if mark is None or k in mark.args}
        wanted = kinds <= allowed and (mark is None or allowed)
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    """SeaweedFS serving S3 on loopback for the whole session, with one bucket."""
    instance = SeaweedFS().start()
    yield instance
    instance.stop()
