"""Shared fixtures: a real graft server process on a loopback port, clients, volume names.

The end-to-end suite runs on every store kind selected with ``--stores`` (default
``fs,s3``): the session ``server`` is parametrized over them, and ``own_server``
uses the same kind as ``server``. S3 is a real SeaweedFS started once per session
(tests/support/s3.py); each server gets its own key prefix in one shared bucket.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator

import pytest

import graft_vfs
from graft_vfs.sample import make_sample_database
from support.auth import Secured, create_tokens
from support.s3 import SeaweedFS
from support.servers import STORE_KINDS, ServerProcess, new_server_process


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
    # The longest modules first (whole modules, so module fixtures stay together): under
    # `-n 2 --dist worksteal` the run then ends on short tests both workers share, not on
    # one worker's 30-second bank or model test while the other is idle.
    items.sort(key=lambda item: item.path.name not in SLOW_MODULES)


SLOW_MODULES = {
    "test_scale_out.py",
    "test_model.py",
    "test_model_rebase.py",
    "test_bank_faults.py",
    "test_demo.py",
    "test_crash_points.py",
}


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    """SeaweedFS serving S3 on loopback for the whole session, with one bucket."""
    instance = SeaweedFS().start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def signed_seaweed() -> Iterator[SeaweedFS]:
    """SeaweedFS that checks the signature of every request (tests/test_direct.py and
    tests/server_side/test_server_s3store.py share it: each uses its own prefixes)."""
    instance = SeaweedFS(signed=True).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    directory = tmp_path_factory.mktemp("auth")
    path = str(directory / "tokens.json")
    tokens = create_tokens(path)
    srv = ServerProcess(str(directory / "store"), args=["--tokens", path]).start()
    yield Secured(srv, tokens, path)
    srv.stop()


@pytest.fixture(scope="session")
def sample_db(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> str:
    """graft_vfs.sample's default database (20+ MB, deterministic), made once per run.

    Under pytest-xdist the workers share one file (made by the first to need it, under
    a lock), instead of each worker making its own (seconds each). Tests only read it.
    """
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent  # the run's directory, shared by its workers
    path = base / "sample.db"
    with open(base / "sample.db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            made = make_sample_database(str(base / f"sample.db.{os.getpid()}"))
            os.replace(made, path)
    assert os.path.getsize(path) >= 20 * 1024 * 1024
    return str(path)
