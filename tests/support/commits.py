"""Pages and commits as a client sends them, for the server tests: committed in process
(``Volumes``) or sent as an HTTP body, and one raw HTTP call to a real server."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import msgpack
import urllib3
import zstandard
from pyroaring import BitMap

from graft_server.segments import upload_segment
from graft_server.volumes import Volumes
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.ids import PAGE_SIZE
from graft_vfs.core.segment import MAX_SEGMENT_PAGES, encode_segment


def page(fill: int) -> bytes:
    """A page of one repeated byte."""
    return bytes([fill]) * PAGE_SIZE


def random_page(seed: int) -> bytes:
    """A page of random bytes (64 repeated), different for every seed."""
    return random.Random(seed).randbytes(64) * (PAGE_SIZE // 64)


def commit_body(vid: str, base: int, page_count: int, pages: Mapping[int, bytes]) -> dict[str, Any]:
    """The body of ``POST /v1/volumes/{vid}/commit`` with ``pages`` inline."""
    return {
        "base": base,
        "page_count": page_count,
        "hash": commit_hash(vid, base, page_count, pages.items()),
        "segment": encode_segment(pages.items())[0],
    }


def commit(vols: Volumes, vid: str, base: int, page_count: int, pages: Mapping[int, bytes]) -> int:
    """Commit ``pages`` as a client does: inline, or as uploaded segments when too many."""
    digest = commit_hash(vid, base, page_count, pages.items())
    items = sorted(pages.items())
    if len(items) <= MAX_SEGMENT_PAGES:
        segment = encode_segment(items)[0] if items else None
        return vols.commits.commit(vid, base, page_count, digest, segment=segment)
    sids = [
        upload_segment(vols.store, encode_segment(items[i : i + MAX_SEGMENT_PAGES])[0])
        for i in range(0, len(items), MAX_SEGMENT_PAGES)
    ]
    return vols.commits.commit(vid, base, page_count, digest, sids=sids)


def call(method: str, url: str, body: object = None) -> tuple[int, Any]:
    """One request to a real server, ``body`` sent as msgpack: (status, decoded answer)."""
    r = urllib3.request(
        method,
        url,
        body=None if body is None else msgpack.packb(body),
        headers={"content-type": "application/x-msgpack"},
        retries=False,
    )
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.status, r.json()
    return r.status, msgpack.unpackb(r.data)


def contents(
    vols: Volumes, vid: str, lsn: int | None = None, count: int | None = None
) -> list[bytes]:
    """Every page of ``vid`` at ``lsn`` (default: the latest), read through ``vols``
    (``count`` of them, else the page count of that LSN)."""
    lsn = vols.reads.head(vid).lsn if lsn is None else lsn
    count = vols.reads.log_entry(vid, lsn).page_count if count is None else count
    frames = vols.reads.read(vid, lsn, BitMap(range(count)))
    dctx = zstandard.ZstdDecompressor()
    return [dctx.decompress(f.frame) if f.frame else bytes(PAGE_SIZE) for f in frames]
