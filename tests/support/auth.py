"""A server with a token file and the tokens it accepts."""

from __future__ import annotations

from dataclasses import dataclass

from graft_server.auth import hash_token
from graft_server.objstore import FsStore

from .clients import graft
from .servers import ServerProcess

WRONG = "graft_" + "W" * 43  # looks like a token, is none
SCOPES = [("rw", "app-*", "write"), ("ro", "app-*", "read"), ("other", "else-*", "write")]


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
