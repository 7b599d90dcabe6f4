"""A server with a token file, and the `graft` command run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from graft_server.auth import hash_token
from graft_server.objstore import FsStore

from .servers import ServerProcess

WRONG = "graft_" + "W" * 43  # looks like a token, is none
SCOPES = [("rw", "app-*", "write"), ("ro", "app-*", "read"), ("other", "else-*", "write")]


def graft(*args: str, token: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    if token is not None:
        env["GRAFT_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "graft_vfs.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"graft {args} failed: {proc.stderr}")
    return proc


@dataclass
class Secured:
    """A server with a token file, the tokens it accepts, and a view of its store."""

    server: ServerProcess
    tokens: dict[str, str]
    path: str

    @property
    def url(self) -> str:
        return self.server.url

    def objects(self) -> dict[str, bytes | None]:
        store = FsStore(self.server.store)
        return {key: store.get(key) for key in store.list("")}

    def secrets(self) -> list[str]:
        return [*self.tokens.values(), *map(hash_token, self.tokens.values()), WRONG]


def create_tokens(path: str) -> dict[str, str]:
    tokens = {}
    for name, glob, access in SCOPES:
        out = graft(
            "token", "create", "--name", name, "--volumes", glob, "--access", access, "--file", path
        )
        tokens[name] = out.stdout.strip()  # stdout is the token and nothing else
        assert tokens[name].startswith("graft_") and "\n" not in tokens[name]
        assert tokens[name] not in out.stderr and repr(name) in out.stderr
    return tokens
