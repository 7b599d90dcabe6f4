"""Bearer tokens: the token file, who a request is, and what it may touch.

A token file is JSON::

    {"tokens": [{"name": "ci", "sha256": "<64 hex digits>", "volumes": "orders*",
                 "access": "read", "created": "2026-01-01T00:00:00Z"}]}

``volumes`` is an ``fnmatch`` glob (or a list of globs) matched case-sensitively
against the volume id; ``access`` is ``read`` or ``write`` (write includes read);
``created`` and any other key are informational. Only the SHA-256 of each token is
stored: tokens are 256-bit random strings (``generate_token``), so nobody can search
for a preimage, and a deliberately slow hash (bcrypt, scrypt) would buy nothing but
cost on every request.

The server re-reads the file when it changes (checked at most every
``RELOAD_INTERVAL`` seconds), so ``graft token revoke`` takes effect without a
restart. A file that became unreadable or invalid keeps the last good set in force
and is logged. No message or log line ever holds a token or its hash: tokens are
named by their ``name``.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from graft_vfs.core.errors import Forbidden, InvalidRequest, Unauthorized

READ = "read"
WRITE = "write"
ACCESS_LEVELS = (READ, WRITE)
TOKEN_PREFIX = "graft_"  # lets secret scanners recognise a leaked token
TOKEN_BYTES = 32
RELOAD_INTERVAL = 1.0  # seconds between checks of the token file for changes
FILE_MODE = 0o600
LOCK_SUFFIX = ".lock"  # tokens.json.lock serializes the edits of tokens.json

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("graft.server")


def generate_token() -> str:
    """A new random token: ``graft_`` and 43 URL-safe characters (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The hex SHA-256 stored for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Token:
    """One entry of the token file: a name, a hash, and a scope."""

    name: str
    digest: bytes  # sha256 of the token
    volumes: tuple[str, ...]  # fnmatch globs on the volume id
    access: str  # READ or WRITE

    def allows(self, access: str, vid: str) -> bool:
        """Whether this token may ``access`` volume ``vid``."""
        if access == WRITE and self.access != WRITE:
            return False
        return any(fnmatch.fnmatchcase(vid, glob) for glob in self.volumes)

    def scope(self) -> str:
        """``token 'ci' (read access to volumes 'orders*')``: for messages and logs."""
        globs = ", ".join(repr(g) for g in self.volumes)
        return f"token {self.name!r} ({self.access} access to volumes {globs})"


def parse_tokens(text: str, source: str) -> list[Token]:
    """The entries of a token file's ``text``; InvalidRequest says what is wrong where."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise InvalidRequest(f'{source} must be a JSON object {{"tokens": [...]}}')
    entries = data["tokens"]
    return [_parse_entry(entry, f"{source}: token #{i + 1}") for i, entry in enumerate(entries)]


def _parse_entry(entry: Any, where: str) -> Token:
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where} is not a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"{where}: 'name' must be 1-128 characters from A-Z a-z 0-9 . _ @ -")
    where = f"{where} ({name!r})"
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise InvalidRequest(f"{where}: 'sha256' must be 64 lowercase hex digits")
    globs = entry.get("volumes")
    if isinstance(globs, str):
        globs = [globs]
    if (
        not isinstance(globs, list)
        or not globs
        or not all(isinstance(g, str) and g and g.isprintable() for g in globs)
    ):
        raise InvalidRequest(f"{where}: 'volumes' must be a glob such as \"orders*\" or a list")
    access = entry.get("access")
    if access not in ACCESS_LEVELS:
        raise InvalidRequest(f'{where}: \'access\' must be "read" or "write"')
    return Token(name, bytes.fromhex(digest), tuple(globs), access)


def bearer_token(header: str | None) -> str:
    """The token in an ``Authorization: Bearer TOKEN`` header, or Unauthorized."""
    if not header:
        raise Unauthorized("this server requires a bearer token and the request had none")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        # The header's content may be a secret: describe it, never repeat it.
        raise Unauthorized("the Authorization header is not of the form 'Bearer TOKEN'")
    return value


class TokenFile:
    """The tokens a server accepts, read from a file and re-read when it changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._tokens = parse_tokens(self._read(), self.path)  # a bad file fails startup
        self._checked = time.monotonic()
        self._failed: str | None = None  # the last reload error, logged once

    def __len__(self) -> int:
        return len(self.tokens())

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"cannot read token file {self.path}: {exc}") from None

    def tokens(self) -> list[Token]:
        """The current entries, re-read if the file changed since the last check."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= RELOAD_INTERVAL:
                self._checked = now
                self._reload()
            return self._tokens

    def _reload(self) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            tokens = parse_tokens(self._read(), self.path)
        except (OSError, InvalidRequest) as exc:
            if self._failed != str(exc):
                log.error("token file not reloaded, the previous tokens stay in force: %s", exc)
                self._failed = str(exc)
            return
        self._signature, self._tokens, self._failed = signature, tokens, None
        log.warning("token file %s reloaded: %d token(s)", self.path, len(tokens))

    def authenticate(self, header: str | None) -> Token:
        """The token named by an Authorization header, or Unauthorized."""
        digest = hashlib.sha256(bearer_token(header).encode("utf-8")).digest()
        found = None
        for token in self.tokens():
            # Constant-time, and no early exit: timing says nothing about which entry.
            if hmac.compare_digest(digest, token.digest):
                found = found or token
        if found is None:
            raise Unauthorized("the bearer token is not valid on this server (unknown or revoked)")
        return found


def authorize(token: Token, access: str, vid: str | None) -> None:
    """Raise Forbidden unless ``token`` may ``access`` volume ``vid``.

    ``vid=None`` is a request not about one volume (a segment upload, the volume
    list): it needs ``access`` to at least one volume, which every read token has.
    """
    if vid is None:
        if access == WRITE and token.access != WRITE:
            raise Forbidden(f"{token.scope()} may not upload segments: that needs write access")
        return
    if not token.allows(access, vid):
        raise Forbidden(f"{token.scope()} may not {access} volume {vid!r}")


# -- editing the file (graft token ...) ---------------------------------------------


def load_entries(path: str) -> list[dict[str, Any]]:
    """The raw entries of a token file (validated); an absent file has none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InvalidRequest(f"cannot read token file {path}: {exc}") from None
    parse_tokens(text, path)
    return list(json.loads(text)["tokens"])


@contextlib.contextmanager
def editing(path: str) -> Iterator[None]:
    """Hold the token file's edit lock: concurrent edits run one after the other.

    Each edit reads the file, changes it and replaces it; two at once would each
    write back what they read and one change would be lost. The lock is an ``flock``
    on a separate file, because the token file itself is replaced, not rewritten.
    """
    lock_path = path + LOCK_SUFFIX
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _unwritable(path: str, exc: OSError) -> InvalidRequest:
    directory = os.path.dirname(os.path.abspath(path))
    if isinstance(exc, FileNotFoundError):
        return InvalidRequest(
            f"cannot write token file {path}: folder {directory} does not exist; create it first"
        )
    return InvalidRequest(f"cannot write token file {path}: {exc.strerror or exc}")


def save_entries(path: str, entries: Iterable[dict[str, Any]]) -> None:
    """Replace the token file atomically; a new file gets mode 0600, an old one keeps its own."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = FILE_MODE
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=".graft-tokens-", dir=directory)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"tokens": list(entries)}, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)  # readers (a running server) see the old or the new file
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def create_token(path: str, name: str, volumes: Iterable[str], access: str) -> str:
    """Add a new token to the file at ``path`` (created 0600) and return it.

    The token itself is returned once and stored nowhere: only its hash is written.
    """
    globs = list(volumes)
    token = generate_token()
    entry = {
        "name": name,
        "sha256": hash_token(token),
        "volumes": globs,
        "access": access,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    _parse_entry(entry, f"new token {name!r}")  # the same rules as the server's
    with editing(path):
        entries = load_entries(path)
        if any(e.get("name") == name for e in entries):
            raise InvalidRequest(f"a token named {name!r} already exists in {path}")
        save_entries(path, [*entries, entry])
    return token


def revoke_token(path: str, name: str) -> None:
    """Remove the token called ``name``; InvalidRequest if there is none."""
    with editing(path):
        entries = load_entries(path)
        kept = [e for e in entries if e.get("name") != name]
        if len(kept) == len(entries):
            raise InvalidRequest(f"no token named {name!r} in {path}")
        save_entries(path, kept)


def describe_entries(path: str) -> list[dict[str, Any]]:
    """Each token's name, volumes (a list of globs), access and creation time: never its hash."""
    described = []
    for e in load_entries(path):
        entry = {k: e[k] for k in ("name", "volumes", "access", "created") if k in e}
        if isinstance(entry["volumes"], str):
            entry["volumes"] = [entry["volumes"]]  # one glob may be stored as a string
        described.append(entry)
    return described
