"""A volume's sync with the server: push, pull, reset and the identity check.

Push sends the union of the pending local commits as one remote commit (a roll-up),
based on the last remote LSN this client synced with. Before sending, the push is
recorded as an intent (target local LSN, base, content hash), so a client killed
after the server accepted it retries the same commit, which the server recognises
by its hash instead of applying it twice.

Pull never overwrites unpushed local commits: the volume is reported diverged and
the user chooses (``graft_reset`` discards the local commits).

Identity. Every answer a pull takes is checked against the identity of the volume the
cache's pages came from (``core.identity``). A server whose volume is another one (the
store was wiped and the name imported again, or the cache was pointed at another
server) refills a clean cache (every cached page becomes a marker, fetched from the
new volume when read) and is refused with ``IdentityMismatch`` while local commits are
pending; ``Sync.reset(force=True)`` discards them and refills. A server that answers an LSN
below the one the cache already has is refused: it lost history.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any, Protocol

from pyroaring import BitMap

from graft_vfs.client.local import LocalStore, PushIntent, VolumeRow
from graft_vfs.client.remote import Remote, RemoteHead, Traffic, required
from graft_vfs.client.stats import Stats
from graft_vfs.core.commit import NONCE_SIZE, commit_hash
from graft_vfs.core.errors import (
    CommitConflict,
    CorruptData,
    Diverged,
    Forbidden,
    IdentityMismatch,
    InvalidRequest,
    RemoteError,
    SnapshotExpired,
    SnapshotNotFound,
    Unauthorized,
)
from graft_vfs.core.faults import crash_point
from graft_vfs.core.identity import Identity
from graft_vfs.core.ids import validate_volume_id
from graft_vfs.core.pages import Page1Conflict, header_page_count, merge_page1

log = logging.getLogger("graft_vfs")

# Rebases of one push before its rejection is reported as divergence.
MAX_REBASES = 8
# A read set larger than this is not kept: that commit is never rebased (see vfs).
MAX_READ_SET = 100_000


class Synced(Protocol):
    """What sync needs of the volume it moves (``volume.Volume``)."""

    @property
    def row(self) -> VolumeRow: ...

    def refresh(self) -> VolumeRow:
        """Reload the volume's sync state from the local store."""
        ...

    def advance(self, lsn: int, page_count: int, changed: BitMap) -> None:
        """Make ``lsn`` the latest local snapshot, ``changed`` pages changed."""
        ...

    def read_page(self, pageno: int, lsn: int) -> bytes:
        """Page ``pageno`` as of local snapshot ``lsn``."""
        ...

    def read_remote_page(self, pageno: int, remote_lsn: int) -> bytes:
        """Page ``pageno`` at a remote LSN the local log does not hold."""
        ...


class Sync:
    """Push, pull and reset of one volume; owned by the volume (``Volume.sync``).

    ``lock`` lets one push, pull or reset run at a time; it is taken before the
    volume's own lock, never while holding it. ``last_error`` is the last failure of
    an exchange with the server, shown by ``graft_status`` (None after a success).
    """

    def __init__(
        self,
        vol: Synced,
        local: LocalStore,
        remote: Remote | None,
        row_id: int,
        vid: str,
        stats: Stats,
    ) -> None:
        self.vol = vol
        self.local = local
        self.remote = remote
        self.row_id = row_id
        self.vid = vid
        self.stats = stats
        self.lock = threading.RLock()
        self.last_error: str | None = None
        self.rebase = False  # Options(rebase=True): rebase a rejected push if serializable

    def check_identity(self, snap: RemoteHead) -> None:
        """At open: reconcile with the server's ``snap``; a mismatch opens, noted, not raised.

        A volume with local commits of another identity stays readable (like a diverged
        volume) so that ``graft reset --force`` can open it and discard them.
        """
        with self.lock:
            self.vol.refresh()
            try:
                self.reconcile(snap)
            except IdentityMismatch as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("graft: %s", exc)

    def reconcile(self, snap: RemoteHead) -> dict[str, Any] | None:
        """Check the server's identity of the volume against the cache's; caller holds ``lock``.

        Returns None if they agree (a volume with no identity yet takes the server's);
        refills a clean cache from another identity and returns the pull's answer; raises
        IdentityMismatch if local commits are pending.
        """
        row = self.vol.row
        if snap.identity is None or row.identity == snap.identity:
            return None
        if row.identity is None:
            # New here, or from a cache older than identities: nothing to compare with.
            self.local.set_identity(self.row_id, snap.identity)
            self.vol.refresh()
            return None
        if row.pending or row.push_intent is not None:
            raise IdentityMismatch(self._mismatch_message(row.identity, snap.identity))
        lsn, changed = self.local.replace_origin(
            self.row_id, snap.lsn, snap.page_count, snap.identity
        )
        self.vol.advance(lsn, snap.page_count, changed)
        log.warning(
            "graft: volume %r on the server is %s, not %s that the cache came from: "
            "cache refilled from the server (%d cached pages dropped)",
            self.vid,
            snap.identity,
            row.identity,
            len(changed),
        )
        self.vol.refresh()
        return _pulled(snap, lsn, changed)

    def push(self) -> dict[str, Any]:
        """Push pending local commits as one remote commit; raises Diverged on conflict.

        With ``rebase`` on, a rejected push is rebased onto the server's new head and
        sent again (up to MAX_REBASES times) when that is serializable (see ``rebase_onto``).
        """
        return self._push(MAX_REBASES if self.rebase else 0)

    def _push(self, rebases_left: int) -> dict[str, Any]:
        remote = required(self.remote)
        rebased = False
        with self.lock:
            row = self.vol.refresh()
            intent = row.push_intent
            nonce = os.urandom(NONCE_SIZE)
            if intent is not None:
                # A push sent before (and maybe landed): the same commit, the same nonce.
                target, base = intent["local_lsn"], intent["base"]
                nonce = intent.get("nonce", b"")  # (none in an intent of an older version)
                if not isinstance(nonce, bytes) or len(nonce) not in (0, NONCE_SIZE):
                    raise CorruptData(
                        f"the push intent of {self.vid!r} in the cache has a bad nonce: "
                        "reset the volume (graft reset) to drop it"
                    )
            elif row.pending == 0:
                return {
                    "pushed": False,
                    "remote_lsn": row.remote_lsn,
                    "local_lsn": row.local_lsn,
                    "local_commits": 0,
                    "pages": 0,
                }
            elif row.diverged:
                raise Diverged(self._diverged_message(None))
            else:
                target, base = row.local_lsn, row.remote_lsn
            local = self.local
            page_count = local.page_count_at(self.row_id, target)
            changed = [
                p
                for p in local.pending_changes(self.row_id, row.sync_lsn, target)
                if p < page_count
            ]
            pages = local.pages_at(self.row_id, changed, target)
            digest = commit_hash(self.vid, base, page_count, pages.items(), nonce)
            local.set_push_intent(self.row_id, PushIntent(target, base, digest, nonce))
            crash_point("client.push.before_send")
            traffic = Traffic()
            try:
                committed = remote.commit(
                    self.vid,
                    base,
                    page_count,
                    pages,
                    digest,
                    traffic,
                    identity=row.identity,
                    nonce=nonce,
                )
            except IdentityMismatch as exc:
                assert row.identity is not None
                server = remote.snapshot(self.vid).identity  # to name it in the message
                raise IdentityMismatch(self._mismatch_message(row.identity, server)) from exc
            except CommitConflict as exc:
                local.set_push_intent(self.row_id, None)
                self.stats.add(pushes_rejected=1)
                why = self.rebase_onto(remote) if rebases_left > 0 else None
                if why is not None or rebases_left == 0:
                    local.set_diverged(self.row_id, True)
                    self.vol.refresh()
                    message = self._diverged_message(exc.latest_lsn)
                    if why:
                        message += f" (not rebased: {why})"
                    raise Diverged(message) from exc
                rebased = True
            except (Unauthorized, Forbidden) as exc:
                # The server refuses a request without a valid token in scope before
                # applying anything, so this send certainly did not land. An intent from an
                # earlier send might have, though: only that same hash, sent again, tells.
                if intent is None:
                    local.set_push_intent(self.row_id, None)
                    self.vol.refresh()
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self.stats.count(traffic, push=True)
            if rebased:
                self.stats.add(rebases=1)
                return self._push(rebases_left - 1)
            crash_point("client.push.after_ack")
            remote_lsn = committed.lsn
            local.record_push(self.row_id, target, remote_lsn, committed.identity)
            self.last_error = None
            self.stats.commits_pushed += 1
            self.stats.pages_pushed += len(pages)
            self.vol.refresh()
            return {
                "pushed": True,
                "remote_lsn": remote_lsn,
                "local_lsn": target,
                "local_commits": target - row.sync_lsn,
                "pages": len(pages),
            }

    def rebase_onto(self, remote: Remote) -> str | None:
        """Rebase the pending local commits onto the server's head; None if done, else why not.

        Serializable only: refused unless no page that the pending commits read (the
        union of their read sets, see ``vfs.GraftFile.read_set``) or wrote changed on
        the server since their base, page 1 aside, and page 1 merges field by field
        (``core.pages.merge_page1``). Caller holds ``lock``.
        """
        row = self.vol.refresh()
        local, v = self.local, self.row_id
        target, sync, base = row.local_lsn, row.sync_lsn, row.remote_lsn
        if row.pending == 0:
            return "nothing is pending"
        reads = local.read_sets(v, sync, target)
        if reads is None:
            return (
                "a local commit has no read set (made without Options(rebase=True), or it "
                f"read more than {MAX_READ_SET} pages)"
            )
        traffic = Traffic()
        try:
            snap, changed = remote.pull(self.vid, base, traffic)
        finally:
            self.stats.count(traffic)
        if snap.identity is not None and row.identity is not None and snap.identity != row.identity:
            return "the server's volume is another one"
        if snap.lsn <= base:
            return "the server has no newer commit"
        page_count = local.page_count_at(v, target)
        written = BitMap(p for p in local.pending_changes(v, sync, target) if p < page_count)
        pages = local.pages_at(v, written, target)
        if 0 in changed:
            base_page1 = self.vol.read_page(0, sync)
            try:
                merged = merge_page1(
                    base_page1,
                    pages.get(0, base_page1),
                    self.vol.read_remote_page(0, snap.lsn),
                )
            except Page1Conflict as exc:
                return str(exc)
            pages[0] = merged
            page_count = header_page_count(merged) or max(page_count, snap.page_count)
        elif snap.page_count != local.page_count_at(v, sync):
            return "the server's page count changed without page 1"
        clash = (changed - BitMap([0])) & (reads | written)
        if clash:
            return (
                f"page {clash.min()}, which a local transaction read or wrote, changed "
                f"on the server ({len(clash)} such page(s))"
            )
        lsn, moved = local.rebase(
            v, target, snap.lsn, snap.page_count, changed, pages, page_count, reads
        )
        self.vol.advance(lsn, page_count, moved)
        self.stats.commits_pulled += snap.lsn - base
        self.vol.refresh()
        log.info(
            "graft: %d local commit(s) of %r rebased from remote LSN %d onto %d",
            row.pending,
            self.vid,
            base,
            snap.lsn,
        )
        return None

    def fork(self, dst: str) -> dict[str, Any]:
        """Save this volume's snapshot and unpushed commits as a new volume ``dst``.

        The server forks the remote LSN the local commits are based on (zero-copy), and
        the local commits are committed to ``dst`` on top of it, so a diverged volume
        keeps its work instead of losing it to a reset. This volume is left as it is
        (``graft_reset`` then discards the local commits, now safe in ``dst``). A retry
        after a lost answer is recognised: the commit's nonce is derived from this
        cache's commits and ``dst``.
        """
        remote = required(self.remote)
        dst = validate_volume_id(dst)
        if dst == self.vid:
            raise InvalidRequest(f"cannot fork {self.vid!r} onto itself: name another volume")
        with self.lock:
            row = self.vol.refresh()
            if row.push_intent is not None and not row.diverged:
                raise InvalidRequest(
                    f"a push of {self.vid!r} is in flight: PRAGMA graft_push first, then fork"
                )
            base, target, local = row.remote_lsn, row.local_lsn, self.local
            if base:
                remote.fork(self.vid, dst, base)
            pages: dict[int, bytes] = {}
            lsn = 1 if base else 0
            if row.pending:
                page_count = local.page_count_at(self.row_id, target)
                changed = [
                    p
                    for p in local.pending_changes(self.row_id, row.sync_lsn, target)
                    if p < page_count
                ]
                pages = local.pages_at(self.row_id, changed, target)
                identity = row.identity.volume_id if row.identity is not None else b""
                nonce = hashlib.sha256(
                    b"graft fork-local\0%s\0%d\0%s" % (identity, target, dst.encode())
                ).digest()[:NONCE_SIZE]
                base_dst = lsn
                digest = commit_hash(dst, base_dst, page_count, pages.items(), nonce)
                traffic = Traffic()
                try:
                    lsn = remote.commit(
                        dst, base_dst, page_count, pages, digest, traffic, nonce=nonce
                    ).lsn
                except CommitConflict as exc:
                    raise CommitConflict(
                        f"volume {dst!r} already exists and is not this fork: name another volume",
                        latest_lsn=exc.latest_lsn,
                    ) from exc
                finally:
                    self.stats.count(traffic, push=True)
            return {
                "volume": dst,
                "lsn": lsn,
                "source": self.vid,
                "source_lsn": base,
                "local_commits": row.pending,
                "pages": len(pages),
            }

    def pull(self) -> dict[str, Any]:
        """Take the server's latest snapshot (metadata and changed-page bitmap only)."""
        remote = required(self.remote)
        with self.lock:
            row = self.vol.refresh()
            if row.push_intent is not None:
                self.push()  # finish the push in flight first: it may have landed
                row = self.vol.refresh()
            traffic = Traffic()
            try:
                snap, changed = remote.pull(self.vid, row.remote_lsn, traffic)
            except SnapshotExpired:
                raise
            except SnapshotNotFound:
                # Our LSN is beyond the server's latest: another volume, or lost history.
                snap = remote.snapshot(self.vid, traffic)
                refilled = self.reconcile(snap)
                if refilled is not None:
                    return refilled
                raise RemoteError(self._backwards_message(snap.lsn)) from None
            finally:
                self.stats.count(traffic)
            refilled = self.reconcile(snap)
            if refilled is not None:
                return refilled
            row = self.vol.row
            if snap.lsn < row.remote_lsn:
                raise RemoteError(self._backwards_message(snap.lsn))
            if snap.lsn == row.remote_lsn:
                return _not_pulled(row)
            if row.pending:
                self.local.set_diverged(self.row_id, True)
                self.vol.refresh()
                raise Diverged(self._diverged_message(snap.lsn))
            lsn = self.local.apply_pull(self.row_id, snap.lsn, snap.page_count, changed)
            self.vol.advance(lsn, snap.page_count, changed)
            self.stats.commits_pulled += snap.lsn - row.remote_lsn
            self.vol.refresh()
            return _pulled(snap, lsn, changed)

    def reset(self, force: bool = False) -> dict[str, Any]:
        """Discard unpushed local commits and take the server's latest snapshot.

        If the server's volume is another one than the cache's (IdentityMismatch), only
        ``force`` discards the commits: they were made on a database the server no longer has.
        """
        with self.lock:
            row = self.vol.refresh()
            remote = self.remote
            if remote is not None and row.identity is not None and not force:
                server = remote.snapshot(self.vid).identity
                if server is not None and server != row.identity and row.pending:
                    raise IdentityMismatch(self._mismatch_message(row.identity, server))
            discarded = row.pending
            result = self.local.discard_pending(self.row_id)
            if result is not None:
                lsn, changed = result
                self.vol.advance(lsn, self.local.page_count_at(self.row_id, lsn), changed)
            self.vol.refresh()
            out = {"discarded_commits": discarded}
            out.update(self.pull() if self.remote is not None else _not_pulled(self.vol.refresh()))
            return out

    def _diverged_message(self, latest: int | None) -> str:
        row = self.vol.row
        where = f"the server is at LSN {latest}" if latest is not None else "the server moved on"
        return (
            f"volume {self.vid!r} diverged: {row.pending} local commit(s) were made on remote "
            f"LSN {row.remote_lsn} and {where}; PRAGMA graft_reset (or `graft reset`) "
            "discards them and takes the server's latest"
        )

    def _mismatch_message(self, cached: Identity, server: Identity | None) -> str:
        row = self.vol.row
        return (
            f"volume {self.vid!r} on {required(self.remote).url} is "
            f"{server or 'another volume'}, but the local "
            f"cache {self.local.cache_dir} holds {cached}, with {row.pending} local commit(s) not "
            "pushed: the name now belongs to another volume (its store was wiped and the name "
            "created again, or this cache was used with another server). `graft reset --force "
            f"{self.vid}` discards those commits and refills the cache from the server; or use a "
            "new cache directory with this server"
        )

    def _backwards_message(self, server_lsn: int) -> str:
        return (
            f"graft server {required(self.remote).url} is at LSN {server_lsn} of "
            f"{self.vid!r}, behind LSN {self.vol.row.remote_lsn} that the local cache "
            f"{self.local.cache_dir} already has from it: the server lost history (a store "
            "restored from an older backup?). Nothing was taken from it; use a new cache "
            "directory to start from what it has now"
        )


def _not_pulled(row: VolumeRow) -> dict[str, Any]:
    """A pull's answer when the volume did not move: the same fields as when it did."""
    return {
        "pulled": False,
        "remote_lsn": row.remote_lsn,
        "local_lsn": row.local_lsn,
        "changed_pages": 0,
        "page_count": row.page_count,
    }


def _pulled(snap: RemoteHead, lsn: int, changed: BitMap) -> dict[str, Any]:
    """A pull's answer when it took the server's snapshot ``snap`` as local LSN ``lsn``."""
    return {
        "pulled": True,
        "remote_lsn": snap.lsn,
        "local_lsn": lsn,
        "changed_pages": len(changed),
        "page_count": snap.page_count,
    }
