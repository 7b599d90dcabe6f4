"""Starting a server: what it checks and cleans before it listens, and how it fails.

Every start-up error is one line on stderr, without a traceback, and the listening
line never appears: exit 1 for errors, 2 for usage errors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from graft_server.objstore import TEMPORARY_GRACE, FsStore
from graft_server.serve import LISTENING
from support.s3 import s3_env
from support.servers import wait_until_listening


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m graft_server`` to completion (it is expected to fail before listening)."""
    return subprocess.run(
        [sys.executable, "-m", "graft_server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@contextmanager
def listening(*args: str) -> Iterator[str]:
    """A started ``python -m graft_server`` (its URL), killed by PID afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft_server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield wait_until_listening(proc)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, result.stderr
    assert LISTENING not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert text in lines[0]


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = start("--store", str(tmp_path / "s"), "--port", port)
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}: Address already in use")


@pytest.mark.parametrize(
    "host, text",
    [
        ("192.0.2.1", "use an address of this machine for --host"),  # TEST-NET-1: not ours
        ("no-such-host.invalid", "check --host"),
    ],
)
def test_an_address_that_cannot_be_bound_is_a_one_line_error(
    tmp_path: Path, host: str, text: str
) -> None:
    result = start("--store", str(tmp_path / "s"), "--host", host, "--port", "0")
    assert_one_line_error(result, 1, text)


@pytest.mark.parametrize(
    "args, text",
    [
        (["--log-level", "bogus"], "Invalid value for '--log-level'"),
        (["--port", "70000"], "Invalid value for '--port'"),
        (["--header-timeout", "0"], "Invalid value for '--header-timeout'"),
        (["--max-connections", "0"], "Invalid value for '--max-connections'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], text: str
) -> None:
    assert_one_line_error(start("--store", str(tmp_path / "s"), *args), 2, text)


def test_every_log_level_uvicorn_knows_starts_a_server(tmp_path: Path) -> None:
    from uvicorn.config import LOG_LEVELS

    from graft_vfs import cli

    for level in ("TRACE", "debug"):
        with listening("--store", str(tmp_path / "s"), "--log-level", level) as url:
            assert url.startswith("http://127.0.0.1:")
    assert cli._LOG_LEVELS == list(LOG_LEVELS)


def test_a_missing_bucket_stops_the_server_before_it_listens(seaweed) -> None:
    result = start(
        "--store", "s3://no-such-bucket/graft", "--s3-endpoint", seaweed.endpoint, "--port", "0",
        env=s3_env(),
    )
    assert_one_line_error(result, 1, "S3 bucket 'no-such-bucket' does not exist")


def test_an_unreachable_store_stops_the_server_before_it_listens() -> None:
    with socket.socket() as held:  # bound, never listened on: connections are refused
        held.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
        result = start(
            "--store", "s3://graft/x", "--s3-endpoint", endpoint, "--port", "0", env=s3_env()
        )
    assert_one_line_error(result, 1, "cannot use the store: ")
    assert endpoint in result.stderr


def test_temporaries_of_killed_writes_are_removed_at_start_up(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    old = store.root / ".tmp" / ("0" * 32)
    live = store.root / ".tmp" / ("1" * 32)
    old.write_bytes(b"from a killed upload")
    live.write_bytes(b"a write in progress in another process")
    then = time.time() - TEMPORARY_GRACE - 60
    os.utime(old, (then, then))
    store.put("kept/object", b"data")
    with listening("--store", str(store.root)):
        assert not old.exists()
        assert live.exists()
        assert store.get("kept/object") == b"data"


def test_remove_stale_temporaries_spares_recent_ones(tmp_path: Path) -> None:
    store = FsStore(tmp_path)
    for name in ("x", "y"):
        (tmp_path / ".tmp" / name).write_bytes(b"t")
    os.utime(tmp_path / ".tmp" / "x", (1000.0, 1000.0))
    assert store.remove_stale_temporaries(100.0, now=2000.0) == 1
    assert sorted(os.listdir(tmp_path / ".tmp")) == ["y"]
