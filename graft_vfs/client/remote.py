"""HTTP client of the graft server: pooled keep-alive connections, retries, timeouts.

This is the boundary where transport errors and error responses become graft_vfs
exceptions; nothing above it sees urllib3.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import msgpack
import urllib3
from pyroaring import BitMap
from urllib3.util.retry import Retry

from graft_vfs.client.direct import DirectReader, Missing, direct_enabled
from graft_vfs.client.link import Link
from graft_vfs.core.commit import MAX_CRC
from graft_vfs.core.envelope import check_int
from graft_vfs.core.errors import (
    CommitConflict,
    CorruptData,
    Forbidden,
    GraftError,
    InvalidRequest,
    RemoteError,
    SnapshotExpired,
    SnapshotNotFound,
    Unauthorized,
    VolumeNotFound,
)
from graft_vfs.core.faults import crash_point
from graft_vfs.core.graft import MAX_PAGES, MAX_PAGES_PER_READ, decode_graft, encode_graft
from graft_vfs.core.identity import Identity
from graft_vfs.core.ids import IDENTITY_SIZE, MAX_LSN, validate_volume_id
from graft_vfs.core.pages import ZERO_PAGE
from graft_vfs.core.protocol import MAX_INLINE_PAGES, MSGPACK, SEGMENT_BODY, error_for_code
from graft_vfs.core.segment import (
    decompress_page,
    encode_segment,
    frame_crc,
    upper_first,
    upper_pages,
)


def _check_token(token: str) -> str:
    """``token`` without surrounding whitespace, refused (unprinted) if a header cannot hold it."""
    token = token.strip()
    if not token or not all("!" <= c <= "~" for c in token):
        # http.client would reject it with an error that quotes the header: the secret.
        raise InvalidRequest("the bearer token is empty or has characters a token cannot have")
    return token


@dataclass
class RemoteHead:
    """The server's view of a volume at one LSN, and which volume (None: not created yet)."""

    vid: str
    lsn: int
    page_count: int
    identity: Identity | None = None


# The largest answer a server may send (a read of MAX_PAGES_PER_READ pages is ~17 MB):
# a bigger one is refused before it is read whole, whatever sends it.
MAX_ANSWER = 64 << 20


class LoggedCommit(NamedTuple):
    """One commit of a volume's log, as ``graft log`` shows it."""

    lsn: int
    time: float  # seconds since the epoch, by the committing server's clock
    page_count: int  # the volume's size after it, in pages
    pages: int  # pages it wrote
    bytes: int  # compressed bytes of those pages
    fork_of: tuple[str, int] | None = None  # a fork's LSN 1: the volume and LSN it forked


class Forked(NamedTuple):
    """A fork the server created: ``vid`` at LSN 1 is ``source`` at ``source_lsn``."""

    vid: str
    source: str
    source_lsn: int
    page_count: int


class Committed(NamedTuple):
    """A commit the server accepted: its LSN, in the volume ``identity``."""

    lsn: int
    identity: Identity


def _identity_fields(identity: Identity | None) -> dict[str, bytes]:
    """Request fields that make the server refuse a request meant for another volume."""
    if identity is None:
        return {}
    return {"store_id": identity.store_id, "volume_id": identity.volume_id}


@dataclass
class Traffic:
    """Requests and bytes that calls moved, for the caller's statistics."""

    requests: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0


def required(remote: Remote | None) -> Remote:
    """``remote``, or the error that says how to configure one."""
    if remote is None:
        raise InvalidRequest(
            "no graft server configured: pass remote= to graft_vfs.register() or set GRAFT_REMOTE"
        )
    return remote


class Remote:
    """A client of one graft server URL; safe to share between threads."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        token: str | None = None,
        direct: bool | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"remote URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        # Every endpoint is safe to retry: reads are pure, and a retried commit carries
        # the same content hash, which the server recognises instead of applying twice.
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=0.2,
            status_forcelist=(502, 503, 504),
            allowed_methods=None,
            raise_on_status=False,
        )
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=8,
            retries=retry,
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
        )
        self._headers = {"Authorization": f"Bearer {_check_token(token)}"} if token else {}
        self.link = Link()
        # Direct reads (client/direct.py): used once the server says it offers them,
        # unless turned off here (direct=False, or GRAFT_DIRECT=0).
        self.direct: DirectReader | None = None
        if direct_enabled() if direct is None else direct:
            self.direct = DirectReader(
                self._locate, self.url, timeout=timeout, observe=self.link.observe, link=self.link
            )
        self.direct_offered = False

    def close(self) -> None:
        self._pool.clear()
        if self.direct is not None:
            self.direct.close()

    def _locate(self, vid: str, body: dict[str, Any], traffic: Traffic | None) -> dict[str, Any]:
        return self._call("POST", f"/v1/volumes/{vid}/locate", body, traffic)

    def _offers_direct(self, d: Any) -> None:
        """Note whether the server offers direct reads (its snapshot and pull answers say)."""
        self.direct_offered = isinstance(d, dict) and d.get("direct") is True

    # -- transport ------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | bytes | None = None,
        traffic: Traffic | None = None,
        content_type: str = MSGPACK,
    ) -> dict[str, Any]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else msgpack.packb(body)
            headers["Content-Type"] = content_type
        started = time.perf_counter()
        try:
            resp = self._pool.request(
                method, self.url + path, body=data, headers=headers, preload_content=False
            )
            try:
                received = self._bounded_body(resp, path)
            except CorruptData:
                resp.close()  # bytes left unread: the connection is not reused
                raise
            resp.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            raise RemoteError(f"graft server {self.url} unreachable: {exc}") from exc
        self.link.observe(time.perf_counter() - started, len(received) + len(data or b""))
        if traffic is not None:
            traffic.requests += 1
            traffic.bytes_received += len(received)
            traffic.bytes_sent += len(data or b"")
        if resp.status >= 400:
            raise self._error(resp, received)
        try:
            answer: dict[str, Any]
            if resp.headers.get("Content-Type", "").startswith("application/json"):
                answer = json.loads(received)
            else:
                answer = msgpack.unpackb(received)
            return answer
        except Exception as exc:
            raise RemoteError(f"graft server sent an unreadable response to {path}") from exc

    def _bounded_body(self, resp: urllib3.BaseHTTPResponse, path: str) -> bytes:
        """The answer's body, refused before it is read whole if over MAX_ANSWER bytes."""
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_ANSWER:
            raise self._invalid(path, f"an answer of {int(declared)} bytes (at most {MAX_ANSWER})")
        body = resp.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER:
            raise self._invalid(path, f"an answer of over {MAX_ANSWER} bytes")
        return body

    def _error(self, resp: urllib3.BaseHTTPResponse, body: bytes) -> GraftError:
        try:
            info = json.loads(body)
            code, message = info.get("error"), info.get("message", "")
        except Exception:
            info, code, message = {}, None, body[:200].decode("utf-8", "replace")
        if code == "conflict":
            return CommitConflict(message or "commit conflict", info.get("latest_lsn"))
        if code == "unauthorized":
            # Never repeat the token: say only whether one was sent and where to set it.
            hint = (
                "check the token given"
                if self._headers
                else "give one with GRAFT_TOKEN, --token or Options(token=...)"
            )
            return Unauthorized(f"graft server {self.url}: {message}; {hint}")
        if code == "forbidden":
            return Forbidden(f"graft server {self.url}: {message}")
        cls = error_for_code(code)
        if cls is not None:
            return cls(message)
        return RemoteError(f"graft server answered {resp.status}: {message}", resp.status)

    # -- API ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health")

    def list_volumes(self) -> list[dict[str, Any]]:
        volumes: list[dict[str, Any]] = self._call("GET", "/v1/volumes")["volumes"]
        return volumes

    def _invalid(self, what: str, why: str) -> CorruptData:
        # An answer that breaks the protocol's own invariants is treated like a failed
        # checksum: nothing of it is used, and retrying the same server cannot help.
        return CorruptData(f"graft server {self.url} sent an invalid answer to {what}: {why}")

    def _answer_int(self, d: Any, name: str, high: int, what: str) -> int:
        if not isinstance(d, dict) or name not in d:
            raise self._invalid(what, f"no {name!r}")
        return check_int(d[name], 0, high, lambda why: self._invalid(what, f"{name!r} {why}"))

    def _identity_of(self, d: dict[str, Any], what: str) -> Identity:
        store_id, volume_id = d.get("store_id"), d.get("volume_id")
        if not (
            isinstance(store_id, bytes)
            and isinstance(volume_id, bytes)
            and len(store_id) == len(volume_id) == IDENTITY_SIZE
        ):
            raise self._invalid(
                what, "no volume and store identity (a graft server from before identities?)"
            )
        return Identity(store_id, volume_id)

    def _snapshot_of(self, vid: str, d: Any, what: str) -> RemoteHead:
        """A snapshot answer, every field checked: nothing out of range reaches the cache."""
        lsn = self._answer_int(d, "lsn", MAX_LSN, what)
        page_count = self._answer_int(d, "page_count", MAX_PAGES - 1, what)
        return RemoteHead(vid, lsn, page_count, self._identity_of(d, what))

    def snapshot(self, vid: str, traffic: Traffic | None = None) -> RemoteHead:
        d = self._call("GET", f"/v1/volumes/{validate_volume_id(vid)}", traffic=traffic)
        self._offers_direct(d)
        return self._snapshot_of(vid, d, f"the snapshot of {vid!r}")

    def opening(
        self, vid: str, budget: int, traffic: Traffic | None = None
    ) -> tuple[RemoteHead, dict[int, tuple[int, bytes]]]:
        """The snapshot and up to ``budget`` of its pages that any first query reads
        (page 1, the schema, the statistics tables, the roots and upper interior levels
        of the B-trees), each verified as a read's are: ``{page: (version_lsn, data)}``."""
        path = f"/v1/volumes/{validate_volume_id(vid)}?open={budget}"
        d = self._call("GET", path, traffic=traffic)
        self._offers_direct(d)
        snap = self._snapshot_of(vid, d, f"the snapshot of {vid!r}")
        pages = self._frames_of(d, vid, snap.lsn, [], budget) if "pages" in d else {}
        first = next(iter(pages), 0)
        if first != 0:  # page 1 is asked for first
            raise CorruptData(
                f"graft server {self.url} answered the opening of {vid!r} with page "
                f"{first} where another page was asked for"
            )
        if pages and max(pages) >= snap.page_count:
            raise self._invalid(f"the opening of {vid!r}", "a page is beyond its page count")
        return snap, pages

    def pull(
        self, vid: str, since: int, traffic: Traffic | None = None
    ) -> tuple[RemoteHead, BitMap]:
        """The latest snapshot and the pages changed in ``(since, latest]``.

        Raises CorruptData for an answer out of range (a page count over MAX_PAGES, a
        graft naming a page at or beyond the page count).
        """
        d = self._call(
            "POST", f"/v1/volumes/{validate_volume_id(vid)}/pull", {"since": since}, traffic
        )
        what = f"a pull of {vid!r}"
        snap = self._snapshot_of(vid, d, what)
        try:
            graft = decode_graft(d.get("graft"))
        except InvalidRequest as exc:
            raise self._invalid(what, str(exc)) from None
        if graft and graft.max() >= snap.page_count:
            raise self._invalid(
                what, f"its graft names page {graft.max()}, beyond its page count {snap.page_count}"
            )
        self._offers_direct(d)
        if self.direct is not None:
            self.direct.advanced(vid, snap.identity, since, snap.lsn, snap.page_count, graft)
        return snap, graft

    def read_pages(
        self,
        vid: str,
        lsn: int,
        pages: Iterable[int],
        traffic: Traffic | None = None,
        *,
        expand: int = 0,
        identity: Identity | None = None,
    ) -> dict[int, tuple[int, bytes]]:
        """Pages as of ``lsn``: ``{page: (version_lsn, 4096 bytes)}``, each verified.

        ``expand`` asks the server to add up to that many interior B-tree pages below
        the requested interior pages; they are in the answer too. With ``identity``,
        the server refuses (IdentityMismatch) if the volume is another one.
        """
        wanted = BitMap(pages)
        if self.direct is not None and self.direct_offered and wanted:
            try:
                return self._read_direct(self.direct, vid, lsn, wanted, traffic, expand, identity)
            except Missing:
                # A segment is gone (GC compacted it): the server knows the new map.
                self.direct.forget(vid)
        return self._read_server(vid, lsn, wanted, traffic, expand, identity)

    def _read_direct(
        self,
        direct: DirectReader,
        vid: str,
        lsn: int,
        wanted: BitMap,
        traffic: Traffic | None,
        expand: int,
        identity: Identity | None,
    ) -> dict[int, tuple[int, bytes]]:
        vid = validate_volume_id(vid)
        return direct.read(vid, lsn, wanted, traffic, expand=expand, identity=identity)

    def _read_server(
        self,
        vid: str,
        lsn: int,
        wanted: BitMap,
        traffic: Traffic | None,
        expand: int,
        identity: Identity | None,
    ) -> dict[int, tuple[int, bytes]]:
        out: dict[int, tuple[int, bytes]] = {}
        path = f"/v1/volumes/{validate_volume_id(vid)}/read"
        ordered = list(wanted)
        for i in range(0, len(ordered), MAX_PAGES_PER_READ):
            chunk = ordered[i : i + MAX_PAGES_PER_READ]
            body = {"lsn": lsn, "pages": encode_graft(chunk), **_identity_fields(identity)}
            if expand:
                body["expand"] = expand
            d = self._call("POST", path, body, traffic)
            out.update(self._frames_of(d, vid, lsn, chunk, expand))
        return out

    def _frames_of(
        self, d: dict[str, Any], vid: str, lsn: int, chunk: list[int], expand: int
    ) -> dict[int, tuple[int, bytes]]:
        """The verified pages of one read answer: nothing of it is kept unless all is good.

        Each frame must match its crc, which binds the page number (a frame or crc
        of another page fails); the answer must hold exactly the pages asked for, in
        order, then at most ``expand`` others, each once; a version is at most ``lsn``.
        """
        what = f"a read of {vid!r} at LSN {lsn}"
        rows = d.get("pages") if isinstance(d, dict) else None
        if not isinstance(rows, list) or len(rows) > len(chunk) + expand:
            raise self._invalid(what, "its page list is missing or too long")
        out: dict[int, tuple[int, bytes]] = {}
        size = 0
        asked = len(chunk)
        for n, row in enumerate(rows):
            if not (type(row) is list and len(row) == 4 and type(row[3]) is bytes):
                raise self._invalid(what, "a page row is not [page, version, crc, frame]")
            page, version, crc, frame = row
            # Exact types (bool is an int subclass): the common case in one test, the
            # checks that say what is wrong only when it fails.
            if not (
                type(page) is int
                and type(version) is int
                and type(crc) is int
                and 0 <= page < MAX_PAGES
                and 0 <= version <= lsn
                and 0 <= crc <= MAX_CRC
            ):
                self._bad_row(what, page, version, crc, lsn)
            if page in out or (n < asked and page != chunk[n]):
                raise CorruptData(
                    f"graft server {self.url} answered a read of {vid!r} with page {page} "
                    "where another page was asked for"
                )
            if frame:
                if frame_crc(page, frame) != crc:
                    raise CorruptData(f"checksum mismatch for page {page}")
                data = decompress_page(frame, page)
            elif version or crc:
                raise self._invalid(what, f"page {page} has a version but no frame")
            else:
                data = ZERO_PAGE
            size += len(frame)
            out[page] = (version, data)
        if len(rows) < len(chunk):
            raise self._invalid(what, f"pages {chunk[len(rows) :][:10]} are missing")
        self.link.observe_pages(size, len(rows))
        return out

    def _invalid_value(self, what: str, name: str, why: str) -> CorruptData:
        return self._invalid(what, f"a {name} {why}")

    def _bad_row(
        self, what: str, page: object, version: object, crc: object, lsn: int
    ) -> NoReturn:
        """Raise the error that says which value of a page row is wrong."""
        for name, value, high in (
            ("page", page, MAX_PAGES - 1),
            ("version", version, lsn),
            ("crc", crc, MAX_CRC),
        ):
            invalid = functools.partial(self._invalid_value, what, name)
            check_int(value, 0, high, invalid)
        raise self._invalid(what, "a page row holds a value that is not an integer")

    def history(self, vid: str, before: int | None = None, limit: int = 100) -> list[LoggedCommit]:
        """Up to ``limit`` commits of ``vid``, newest first, below LSN ``before``."""
        what = f"the log of {vid!r}"
        path = f"/v1/volumes/{validate_volume_id(vid)}/history"
        answer = self._call("POST", path, {"before": int(before or 0), "limit": int(limit)})
        commits = answer.get("commits")
        if not isinstance(commits, list) or len(commits) > limit:
            raise self._invalid(what, "no list of at most the commits asked for")
        out = [self._logged_commit(c, what) for c in commits]
        if any(a.lsn <= b.lsn for a, b in zip(out, out[1:])) or (
            before and out and out[0].lsn >= before
        ):
            raise self._invalid(what, "commits out of order or beyond the LSN asked for")
        return out

    def lsn_at(self, vid: str, when: float) -> LoggedCommit:
        """The latest commit of ``vid`` made at or before ``when`` (seconds since the epoch)."""
        what = f"the LSN of {vid!r} at a time"
        answer = self._call("POST", f"/v1/volumes/{validate_volume_id(vid)}/at", {"time": when})
        commit = self._logged_commit(answer, what)
        if commit.time > when:
            raise self._invalid(what, "a commit made after the time asked for")
        return commit

    def delete(self, vid: str) -> int:
        """Delete volume ``vid`` on the server; returns the latest LSN it had."""
        d = self._call("DELETE", f"/v1/volumes/{validate_volume_id(vid)}")
        return self._answer_int(d, "lsn", MAX_LSN, f"the deletion of {vid!r}")

    def fork(self, source: str, vid: str, lsn: int | None = None) -> Forked:
        """Create ``vid`` as a zero-copy fork of ``source`` at ``lsn`` (default: latest)."""
        what = f"the fork of {source!r} into {vid!r}"
        body: dict[str, Any] = {"source": validate_volume_id(source)}
        if lsn is not None:
            body["lsn"] = int(lsn)
        d = self._call("POST", f"/v1/volumes/{validate_volume_id(vid)}/fork", body)
        if d.get("vid") != vid or d.get("source") != source or d.get("lsn") != 1:
            raise self._invalid(what, "another volume, source or LSN")
        forked = Forked(
            vid,
            source,
            self._answer_int(d, "source_lsn", MAX_LSN, what),
            self._answer_int(d, "page_count", MAX_PAGES - 1, what),
        )
        if lsn is not None and forked.source_lsn != lsn:
            raise self._invalid(what, f"forked LSN {forked.source_lsn}, not {lsn}")
        return forked

    def _logged_commit(self, d: Any, what: str) -> LoggedCommit:
        time_ = d.get("time") if isinstance(d, dict) else None
        if type(time_) is not float or not 0 <= time_ < 1e11:
            raise self._invalid(what, "no commit time")
        origin = d.get("fork_of")
        fork_of = None
        if origin is not None:
            if not isinstance(origin, dict) or not isinstance(origin.get("vid"), str):
                raise self._invalid(what, "a fork origin that is not a volume and an LSN")
            fork_of = (
                validate_volume_id(origin["vid"]),
                self._answer_int(origin, "lsn", MAX_LSN, what),
            )
        return LoggedCommit(
            lsn=self._answer_int(d, "lsn", MAX_LSN, what),
            time=time_,
            page_count=self._answer_int(d, "page_count", MAX_PAGES, what),
            pages=self._answer_int(d, "pages", MAX_PAGES, what),
            bytes=self._answer_int(d, "bytes", MAX_LSN, what),
            fork_of=fork_of,
        )

    def log_entry(self, vid: str, lsn: int) -> dict[str, Any] | None:
        try:
            return self._call("GET", f"/v1/volumes/{validate_volume_id(vid)}/log/{int(lsn)}")
        except SnapshotExpired:
            raise
        except (SnapshotNotFound, VolumeNotFound):
            return None

    def commit(
        self,
        vid: str,
        base: int,
        page_count: int,
        pages: dict[int, bytes],
        digest: bytes,
        traffic: Traffic | None = None,
        identity: Identity | None = None,
        nonce: bytes = b"",
    ) -> Committed:
        """Commit ``pages`` on top of ``base``; returns the new LSN or raises CommitConflict.

        ``digest`` is ``core.commit.commit_hash`` of the commit: a retry with the same
        digest after a lost response is recognised by the server, never applied twice.
        With ``identity``, the server refuses (IdentityMismatch) to commit on top of
        another volume than the one ``base`` belongs to.
        """
        validate_volume_id(vid)
        body: dict[str, Any] = {
            "base": base,
            "page_count": page_count,
            "hash": digest,
            **_identity_fields(identity),
            **({"nonce": nonce} if nonce else {}),
        }
        items = sorted(pages.items())
        if len(items) <= MAX_INLINE_PAGES:
            body["segment"] = encode_segment(items)[0]
        else:
            sids = []
            for chunk in upper_first(pages, upper_pages(items), MAX_INLINE_PAGES):
                seg, _ = encode_segment((p, pages[p]) for p in chunk)
                d = self._call("POST", "/v1/segments", seg, traffic, content_type=SEGMENT_BODY)
                sids.append(d["sid"])
                crash_point("client.push.after_segment")
            body["segments"] = sids
        d = self._call("POST", f"/v1/volumes/{vid}/commit", body, traffic)
        what = f"a commit to {vid!r}"
        done = Committed(self._answer_int(d, "lsn", MAX_LSN, what), self._identity_of(d, what))
        if self.direct is not None and done.lsn == base + 1:
            changed = BitMap(pages)
            self.direct.advanced(vid, done.identity, base, done.lsn, page_count, changed)
        return done
