"""Deleting a volume (`graft delete`, DELETE /v1/volumes/{vid}) on every store kind."""

from __future__ import annotations

import json

import apsw
import pytest

import graft_vfs
from graft_server.deletion import delete
from graft_server.gc import Retention, collect
from graft_server.objstore import MemoryStore
from graft_server.volumes import Volumes
from graft_vfs.client.remote import Remote
from graft_vfs.core.errors import CorruptData, VolumeNotFound
from support.clients import graft, pragma
from support.commits import commit, contents, page


def stored(store: MemoryStore, prefix: str) -> int:
    return sum(len(store.get(k) or b"") for k in store.list(prefix))


def test_servers_that_cached_a_deleted_volume_answer_not_found_then_the_new_one():
    store = MemoryStore()
    a, b, c = Volumes(store), Volumes(store), Volumes(store)
    lsn = 0
    for i in range(3):
        lsn = commit(a, "v", lsn, 2, {0: page(i), 1: page(10 + i)})
    assert b.reads.head("v").lsn == c.reads.head("v").lsn == 3
    old_id = a.index.identity("v").volume_id

    assert delete(a.index, "v").lsn == 3
    assert store.list("volumes/v/log/") == [] and store.list("volumes/v/checkpoints/") == []
    for vols in (a, b, Volumes(store)):
        with pytest.raises(VolumeNotFound):
            vols.reads.head("v")
    assert "v" not in [h.vid for h in Volumes(store).reads.list_volumes()]
    with pytest.raises(VolumeNotFound, match="does not exist"):
        delete(a.index, "v")

    # The name lives again: a new volume, which every server reads, c (which cached the
    # old one at LSN 3 and never heard of the deletion) too, once the new one passes it.
    lsn = 0
    for i in range(5):
        lsn = commit(b, "v", lsn, 1, {0: page(50 + i)})
    assert b.index.identity("v").volume_id != old_id
    for vols in (a, c, Volumes(store)):
        assert vols.reads.head("v").lsn == 5
        assert contents(vols, "v") == [page(54)]


def test_a_deletion_cut_short_is_refused_as_corrupt_and_finished_by_deleting_again():
    store = MemoryStore()
    vols = Volumes(store, checkpoint_every=1000)
    lsn = 0
    for i in range(4):
        lsn = commit(vols, "v", lsn, 1, {0: page(i)})
    store.delete("volumes/v/log/" + "1".zfill(20))  # a delete killed after the first record
    with pytest.raises(CorruptData, match="gap"):
        Volumes(store).reads.head("v")
    assert delete(Volumes(store).index, "v").records == 3
    with pytest.raises(VolumeNotFound):
        Volumes(store).reads.head("v")


def test_gc_frees_a_deleted_volume_once_no_fork_names_its_segments():
    store = MemoryStore()
    vols = Volumes(store)
    lsn = commit(vols, "src", 0, 64, {p: page(p) for p in range(64)})
    commit(vols, "src", lsn, 64, {0: page(99)})
    vols.forks.fork("src", "fork")
    delete(vols.index, "src")
    before = stored(store, "segments/")
    collect(Volumes(store), Retention(), grace=0)
    assert stored(store, "segments/") == before  # the fork names every segment
    assert contents(Volumes(store), "fork")[:2] == [page(99), page(1)]
    delete(vols.index, "fork")
    collect(Volumes(store), Retention(), grace=0)
    assert stored(store, "segments/") == 0


def test_graft_delete_removes_the_name_and_clients_get_a_clear_error(server, vid, client,
                                                                     tmp_path):
    con = client(vid, options=graft_vfs.Options(autopush=False))
    con.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1)")
    lsn = pragma(con, "graft_push")["remote_lsn"]

    refused = graft("delete", vid, "--remote", server.url, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr  # no terminal to ask on
    assert Remote(server.url).snapshot(vid).lsn == lsn

    out = graft("delete", vid, "--remote", server.url, "--yes").stdout
    assert json.loads(out) == {"volume": vid, "deleted": True, "lsn": lsn}
    with pytest.raises(VolumeNotFound):
        Remote(server.url).snapshot(vid)
    assert vid not in [v["vid"] for v in Remote(server.url).list_volumes()]
    with pytest.raises(apsw.CantOpenError, match=f"volume '{vid}' was deleted"):
        con.execute("PRAGMA graft_pull")
    fresh = graft("sql", vid, "SELECT 1", "--remote", server.url,
                  "--cache", str(tmp_path / "fresh"), check=False)
    assert fresh.returncode == 1 and f"no volume {vid!r}" in fresh.stderr
    again = graft("delete", vid, "--remote", server.url, "--yes", check=False)
    assert again.returncode == 1 and f"no volume {vid!r}" in again.stderr
