"""Push, pull and reset: moving a volume between the local store and the server.

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
pending; ``reset(force=True)`` discards them and refills. A server that answers an LSN
below the one the cache already has is refused: it lost history.
"""

from __future__ import annotations

import logging

from graft_vfs.client.local import PushIntent, VolumeRow
from graft_vfs.client.remote import Snapshot, Transfer
from graft_vfs.client.volume import Volume
from graft_vfs.core.commit import commit_hash
from graft_vfs.core.errors import (
    CommitConflict,
    Diverged,
    Forbidden,
    IdentityMismatch,
    RemoteError,
    SnapshotExpired,
    SnapshotNotFound,
    Unauthorized,
)
from graft_vfs.core.faults import crash_point
from graft_vfs.core.identity import Identity

log = logging.getLogger("graft_vfs")


def _diverged_message(vol: Volume, latest: int | None) -> str:
    row = vol.row
    where = f"the server is at LSN {latest}" if latest is not None else "the server moved on"
    return (
        f"volume {vol.vid!r} diverged: {row.pending} local commit(s) were made on remote "
        f"LSN {row.remote_lsn} and {where}; PRAGMA graft_reset (or `graft reset`) "
        "discards them and takes the server's latest"
    )


def _mismatch_message(vol: Volume, cached: Identity, server: Identity | None) -> str:
    row = vol.row
    return (
        f"volume {vol.vid!r} on {vol.runtime.require_remote().url} is "
        f"{server or 'another volume'}, but the local "
        f"cache {vol.runtime.cache_dir} holds {cached}, with {row.pending} local commit(s) not "
        "pushed: the name now belongs to another volume (its store was wiped and the name "
        "created again, or this cache was used with another server). `graft reset --force "
        f"{vol.vid}` discards those commits and refills the cache from the server; or use a "
        "new cache directory with this server"
    )


def _backwards_message(vol: Volume, server_lsn: int) -> str:
    return (
        f"graft server {vol.runtime.require_remote().url} is at LSN {server_lsn} of "
        f"{vol.vid!r}, behind LSN {vol.row.remote_lsn} that the local cache "
        f"{vol.runtime.cache_dir} already has from it: the server lost history (a store "
        "restored from an older backup?). Nothing was taken from it; use a new cache "
        "directory to start from what it has now"
    )


def reconcile(vol: Volume, snap: Snapshot) -> dict | None:
    """Check the server's identity of the volume against the cache's; caller holds sync_lock.

    Returns None if they agree (a volume with no identity yet takes the server's);
    refills a clean cache from another identity and returns the pull's answer; raises
    IdentityMismatch if local commits are pending.
    """
    row = vol.row
    if snap.identity is None or row.identity == snap.identity:
        return None
    if row.identity is None:
        # New here, or from a cache older than identities: nothing to compare with.
        vol.local.set_identity(vol.id, snap.identity)
        vol.refresh()
        return None
    if row.pending or row.push_intent is not None:
        raise IdentityMismatch(_mismatch_message(vol, row.identity, snap.identity))
    lsn, changed = vol.local.replace_origin(vol.id, snap.lsn, snap.page_count, snap.identity)
    vol.advance(lsn, snap.page_count, changed)
    log.warning(
        "graft: volume %r on the server is %s, not %s that the cache came from: "
        "cache refilled from the server (%d cached pages dropped)",
        vol.vid,
        snap.identity,
        row.identity,
        len(changed),
    )
    vol.refresh()
    return {
        "pulled": True,
        "remote_lsn": snap.lsn,
        "local_lsn": lsn,
        "changed_pages": len(changed),
        "page_count": snap.page_count,
    }


def push(vol: Volume) -> dict:
    """Push pending local commits as one remote commit; raises Diverged on conflict."""
    remote = vol.runtime.require_remote()
    with vol.sync_lock:
        row = vol.refresh()
        intent = row.push_intent
        if intent is not None:
            target, base = intent["local_lsn"], intent["base"]
        elif row.pending == 0:
            return {
                "pushed": False,
                "remote_lsn": row.remote_lsn,
                "local_lsn": row.local_lsn,
                "local_commits": 0,
                "pages": 0,
            }
        elif row.diverged:
            raise Diverged(_diverged_message(vol, None))
        else:
            target, base = row.local_lsn, row.remote_lsn
        local = vol.local
        page_count = local.page_count_at(vol.id, target)
        changed = [p for p in local.pending_changes(vol.id, row.sync_lsn, target) if p < page_count]
        pages = local.pages_at(vol.id, changed, target)
        digest = commit_hash(vol.vid, base, page_count, pages.items())
        local.set_push_intent(vol.id, PushIntent(target, base, digest))
        crash_point("client.push.before_send")
        transfer = Transfer()
        try:
            committed = remote.commit(
                vol.vid, base, page_count, pages, digest, transfer, identity=row.identity
            )
        except IdentityMismatch as exc:
            assert row.identity is not None
            server = remote.snapshot(vol.vid).identity  # to name it in the message
            raise IdentityMismatch(_mismatch_message(vol, row.identity, server)) from exc
        except CommitConflict as exc:
            local.set_push_intent(vol.id, None)
            local.set_diverged(vol.id, True)
            vol.refresh()
            raise Diverged(_diverged_message(vol, exc.latest_lsn)) from exc
        except (Unauthorized, Forbidden) as exc:
            # The server refuses a request without a valid token in scope before
            # applying anything, so this send certainly did not land. An intent from an
            # earlier send might have, though: only that same hash, sent again, tells.
            if intent is None:
                local.set_push_intent(vol.id, None)
                vol.refresh()
            vol.last_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            vol.stats.count(transfer, push=True)
        crash_point("client.push.after_ack")
        remote_lsn = committed.lsn
        local.record_push(vol.id, target, remote_lsn, committed.identity)
        vol.last_error = None
        vol.stats.commits_pushed += 1
        vol.stats.pages_pushed += len(pages)
        vol.refresh()
        return {
            "pushed": True,
            "remote_lsn": remote_lsn,
            "local_lsn": target,
            "local_commits": target - row.sync_lsn,
            "pages": len(pages),
        }


def pull(vol: Volume) -> dict:
    """Take the server's latest snapshot (metadata and changed-page bitmap only)."""
    remote = vol.runtime.require_remote()
    with vol.sync_lock:
        row = vol.refresh()
        if row.push_intent is not None:
            push(vol)  # finish the push in flight first: it may have landed
            row = vol.refresh()
        transfer = Transfer()
        try:
            snap, changed = remote.pull(vol.vid, row.remote_lsn, transfer)
        except SnapshotExpired:
            raise
        except SnapshotNotFound:
            # Our LSN is beyond the server's latest: another volume, or lost history.
            snap = remote.snapshot(vol.vid, transfer)
            refilled = reconcile(vol, snap)
            if refilled is not None:
                return refilled
            raise RemoteError(_backwards_message(vol, snap.lsn)) from None
        finally:
            vol.stats.count(transfer)
        refilled = reconcile(vol, snap)
        if refilled is not None:
            return refilled
        row = vol.row
        if snap.lsn < row.remote_lsn:
            raise RemoteError(_backwards_message(vol, snap.lsn))
        if snap.lsn == row.remote_lsn:
            return _not_pulled(row)
        if row.pending:
            vol.local.set_diverged(vol.id, True)
            vol.refresh()
            raise Diverged(_diverged_message(vol, snap.lsn))
        lsn = vol.local.apply_pull(vol.id, snap.lsn, snap.page_count, changed)
        vol.advance(lsn, snap.page_count, changed)
        vol.stats.commits_pulled += snap.lsn - row.remote_lsn
        vol.refresh()
        return {
            "pulled": True,
            "remote_lsn": snap.lsn,
            "local_lsn": lsn,
            "changed_pages": len(changed),
            "page_count": snap.page_count,
        }


def reset(vol: Volume, force: bool = False) -> dict:
    """Discard unpushed local commits and take the server's latest snapshot.

    If the server's volume is another one than the cache's (IdentityMismatch), only
    ``force`` discards the commits: they were made on a database the server no longer has.
    """
    with vol.sync_lock:
        row = vol.refresh()
        remote = vol.runtime.remote
        if remote is not None and row.identity is not None and not force:
            server = remote.snapshot(vol.vid).identity
            if server is not None and server != row.identity and row.pending:
                raise IdentityMismatch(_mismatch_message(vol, row.identity, server))
        discarded = row.pending
        result = vol.local.discard_pending(vol.id)
        if result is not None:
            lsn, changed = result
            vol.advance(lsn, vol.local.page_count_at(vol.id, lsn), changed)
        vol.refresh()
        out = {"discarded_commits": discarded}
        out.update(pull(vol) if vol.runtime.remote is not None else _not_pulled(vol.refresh()))
        return out


def _not_pulled(row: VolumeRow) -> dict:
    """A pull's answer when the volume did not move: the same fields as when it did."""
    return {
        "pulled": False,
        "remote_lsn": row.remote_lsn,
        "local_lsn": row.local_lsn,
        "changed_pages": 0,
        "page_count": row.page_count,
    }
