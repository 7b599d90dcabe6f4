"""The server as a user runs it: ``python -m graft_server`` in a real process, over real HTTP."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import urllib3
import zstandard
from pyroaring import BitMap

from graft_vfs.core.commit import commit_hash
from graft_vfs.core.segment import encode_segment
from support.commits import call, page
from support.s3 import s3_env
from support.servers import running_server


def identity_of(answer: dict[str, Any]) -> dict[str, bytes]:
    return {"volume_id": answer["volume_id"], "store_id": answer["store_id"]}


def committed_lsn(answer: tuple[int, Any]) -> int | None:
    """The LSN of a commit answered 200 (which also carries the volume's identity)."""
    status, body = answer
    return body["lsn"] if status == 200 else None


COMMIT = {
    "base": 0,
    "page_count": 2,
    "hash": commit_hash("v", 0, 2, [(0, page(1)), (1, page(2))]),
    "segment": encode_segment([(0, page(1)), (1, page(2))])[0],
}


def test_real_server_commit_and_read(tmp_path: Path) -> None:
    with running_server(tmp_path / "store") as (proc, url):
        assert call("GET", f"{url}/v1/health")[0] == 200
        assert committed_lsn(call("POST", f"{url}/v1/volumes/v/commit", COMMIT)) == 1
        read = {"lsn": 1, "pages": BitMap([0, 1]).serialize()}
        status, answer = call("POST", f"{url}/v1/volumes/v/read", read)
        assert status == 200
        dctx = zstandard.ZstdDecompressor()
        assert [dctx.decompress(frame) for _, _, _, frame in answer["pages"]] == [page(1), page(2)]
        status, error = call("POST", f"{url}/v1/volumes/v/pull", b"not a map")
        assert (status, error["error"]) == (400, "invalid_request")
        status, before = call("GET", f"{url}/v1/volumes/v")
        assert status == 200 and before["lsn"] == 1
    assert proc.returncode is not None
    with running_server(tmp_path / "store") as (_, url):  # the store outlives the process
        # The same volume, identity included: a restart is not a new incarnation.
        assert call("GET", f"{url}/v1/volumes/v") == (
            200,
            {"vid": "v", "lsn": 1, "page_count": 2, **identity_of(before)},
        )


@pytest.mark.stores("s3")
def test_real_server_on_s3(seaweed) -> None:
    prefix = seaweed.new_prefix()
    options = {"args": ["--s3-endpoint", seaweed.endpoint], "env": s3_env()}
    with running_server(seaweed.spec(prefix), **options) as (_, url):
        assert committed_lsn(call("POST", f"{url}/v1/volumes/v/commit", COMMIT)) == 1
    with running_server(seaweed.spec(prefix), **options) as (_, url):  # outlives the process
        assert call("GET", f"{url}/v1/volumes/v")[1]["lsn"] == 1
        assert call("POST", f"{url}/v1/volumes/v/commit", COMMIT)[0] == 200  # a retry
    assert seaweed.store(prefix).list("volumes/v/log/") == ["volumes/v/log/" + "1".zfill(20)]


@pytest.mark.parametrize("point", ["server.commit.after_segment", "server.commit.after_log"])
def test_crash_mid_commit_then_retry(tmp_path: Path, point: str) -> None:
    with running_server(tmp_path, crash_at=point) as (proc, url):
        with pytest.raises(urllib3.exceptions.HTTPError):
            call("POST", f"{url}/v1/volumes/v/commit", COMMIT)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    with running_server(tmp_path) as (_, url):
        status, _ = call("GET", f"{url}/v1/volumes/v")
        assert status == (404 if point == "server.commit.after_segment" else 200)
        # The client retries with the same hash: applied exactly once either way.
        assert committed_lsn(call("POST", f"{url}/v1/volumes/v/commit", COMMIT)) == 1
        assert call("GET", f"{url}/v1/volumes/v/log/1")[1]["hash"] == COMMIT["hash"]
        assert call("GET", f"{url}/v1/volumes/v/log/2")[0] == 404
