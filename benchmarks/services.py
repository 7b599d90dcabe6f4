"""Everything a benchmark run starts: SeaweedFS (S3), link proxies, a graft server.

Topology (every address on 127.0.0.1)::

    graft client --[proxy "graft": the link]--> graft server --[proxy "store"]--> SeaweedFS S3
    baselines    --[proxy "s3": the link]----------------------------------------> SeaweedFS S3

The "graft" and "s3" proxies carry the link profile under test, so graft and the
baselines that move data cross the same simulated link. The "store" proxy never
delays: it stands for the fast path between a server and its object store, and
counts the server's object-store requests (each PUT is one object write).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import boto3
from botocore.config import Config

from benchmarks.linkproxy import LOOPBACK, Link, ProxyProcess
from graft_vfs.client.dbfile import import_database
from graft_vfs.client.remote import Remote
from tests.support.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, SeaweedFS, s3_env
from tests.support.servers import wait_until_listening

BUCKET = "graft-bench"
VOLUME = "bench"
FULL_KEY = "full/bench.db"
S3VFS_PREFIX = "s3vfs/bench.db"
STARTUP_TIMEOUT = 60.0


def s3_client(endpoint: str, *, pool: int = 10):
    """A boto3 S3 client of ``endpoint`` (path-style, checksums only where required)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
        config=s3_config(pool),
    )


def s3_config(pool: int = 10) -> Config:
    return Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=pool,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=600,
    )


def s3_bucket(endpoint: str):
    """A boto3 Bucket resource of the benchmark bucket at ``endpoint`` (for sqlite-s3vfs)."""
    resource = boto3.resource(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
        config=s3_config(),
    )
    return resource.Bucket(BUCKET)


class GraftServer:
    """A ``graft server`` child process on an S3 store, stopped by PID."""

    def __init__(self, store: str, s3_endpoint: str, direct_endpoint: str | None = None) -> None:
        self.store = store
        self.s3_endpoint = s3_endpoint
        # Where clients reach S3 for direct reads (the presigned URLs name it).
        self.direct_endpoint = direct_endpoint
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GraftServer:
        cmd = [sys.executable, "-m", "graft_vfs.cli", "server", "--store", self.store]
        cmd += ["--s3-endpoint", self.s3_endpoint, "--port", str(self.port)]
        if self.direct_endpoint and os.environ.get("GRAFT_BENCH_DIRECT") == "1":
            # Direct reads are opt-in (graft server --direct): measured when asked for.
            cmd += ["--direct", "--direct-endpoint", self.direct_endpoint]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **s3_env()}
        )
        url = wait_until_listening(self.proc, STARTUP_TIMEOUT)
        self.port = int(url.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port: a cold server (empty caches), same URL."""
        self.stop()
        self.start()


@dataclass
class Setup:
    """How long loading the data into each system took (not part of any measurement)."""

    seaweed_start: float = 0.0
    graft_import: float = 0.0
    full_upload: float = 0.0
    s3vfs_upload: float = 0.0
    s3vfs_objects: int = 0


class Services:
    """Starts everything, loads one database into every remote system, stops everything."""

    def __init__(self, db_path: str, s3vfs_path: str, *, s3vfs_block_size: int) -> None:
        self.db_path = db_path
        self.s3vfs_path = s3vfs_path  # the same rows, with pages as large as s3vfs's blocks
        self.s3vfs_block_size = s3vfs_block_size
        self.work = tempfile.mkdtemp(prefix="graft-bench-")
        self.seaweed = SeaweedFS(BUCKET)
        self.proxies: ProxyProcess | None = None
        self.server: GraftServer | None = None
        self.setup = Setup()
        self.ports: dict[str, int] = {}
        self.link: Link = LOOPBACK
        # every SQL statement committed to the volume since it was loaded, in order, so a
        # native copy can be brought to the same rows: [(sql, params), ...]
        self.applied: list[tuple[str, tuple]] = []

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Services:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t = time.perf_counter()
        self.seaweed.start()
        self.setup.seaweed_start = time.perf_counter() - t
        s3_port = int(self.seaweed.endpoint.rsplit(":", 1)[1])
        self.proxies = ProxyProcess()
        self.ports["s3"] = self.proxies.add("s3", s3_port)
        self.ports["store"] = self.proxies.add("store", s3_port)
        store = f"s3://{BUCKET}/graft-{uuid.uuid4().hex[:8]}"
        # The server reads S3 through "store" (never delayed); clients' direct reads go
        # through "s3", the link every client-side system crosses.
        self.server = GraftServer(store, self.url("store"), self.url("s3")).start()
        self.ports["graft"] = self.proxies.add("graft", self.server.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.proxies is not None:
            self.proxies.close()
        self.seaweed.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- addresses and counters ---------------------------------------------------------

    def url(self, proxy: str) -> str:
        """The URL of a proxy: "graft" (graft server), "s3" (S3 for baselines), "store"."""
        return f"http://127.0.0.1:{self.ports[proxy]}"

    @property
    def direct_graft_url(self) -> str:
        """The graft server without any proxy: for setup and for other clients' writes."""
        assert self.server is not None
        return self.server.url

    def set_link(self, link: Link) -> None:
        """Put the graft and s3 proxies on ``link`` (the store proxy never delays)."""
        assert self.proxies is not None
        self.proxies.set_link("graft", link)
        self.proxies.set_link("s3", link)
        self.link = link

    def reset(self, *names: str) -> None:
        assert self.proxies is not None
        for name in names:
            self.proxies.reset(name)

    def stats(self, name: str) -> dict:
        assert self.proxies is not None
        return self.proxies.stats(name)

    @property
    def server_pid(self) -> int | None:
        proc = self.server.proc if self.server is not None else None
        return proc.pid if proc is not None else None

    @property
    def store_pid(self) -> int | None:
        return self.seaweed.proc.pid if self.seaweed.proc is not None else None

    def warm_server(self) -> float:
        """Read every page of the volume once through the server (no proxy), so its
        frame cache holds them all, as a long-running server's would; returns seconds."""
        t = time.perf_counter()
        remote = Remote(self.direct_graft_url, timeout=600)
        try:
            head = remote.snapshot(VOLUME)
            step = 4096
            starts = range(0, head.page_count, step)

            def read(start: int) -> None:
                end = min(start + step, head.page_count)
                remote.read_pages(VOLUME, head.lsn, range(start, end))

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(read, starts))
        finally:
            remote.close()
        return time.perf_counter() - t

    def restart_server(self) -> None:
        """A cold graft server (no cached frames or volume state), same port."""
        assert self.server is not None
        self.server.restart()

    # -- loading ------------------------------------------------------------------------

    def load(self, *, full: bool = True, s3vfs: bool = True) -> None:
        """The database as a graft volume, as one S3 object (with ``full``), and in
        sqlite-s3vfs's layout (with ``s3vfs``)."""
        t = time.perf_counter()
        remote = Remote(self.direct_graft_url, timeout=600)
        try:
            import_database(remote, self.db_path, VOLUME)
        finally:
            remote.close()
        self.setup.graft_import = time.perf_counter() - t

        direct = s3_client(self.seaweed.endpoint, pool=16)
        if full:
            t = time.perf_counter()
            direct.upload_file(self.db_path, BUCKET, FULL_KEY)
            self.setup.full_upload = time.perf_counter() - t
        if not s3vfs:
            return

        # sqlite-s3vfs's layout (S3VFS.deserialize_iter): block i of the file at
        # "{prefix}/{i:010d}". Uploaded in parallel here; its own loader is sequential.
        t = time.perf_counter()
        bs = self.s3vfs_block_size
        size = os.path.getsize(self.s3vfs_path)
        blocks = (size + bs - 1) // bs

        def put(i: int) -> None:
            with open(self.s3vfs_path, "rb") as f:
                f.seek(i * bs)
                data = f.read(bs)
            direct.put_object(Bucket=BUCKET, Key=f"{S3VFS_PREFIX}/{i:010d}", Body=data)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(blocks)))
        self.setup.s3vfs_upload = time.perf_counter() - t
        self.setup.s3vfs_objects = blocks
