"""The volume services of one object store, wired together for the app and GC.

Each concern is its own module: ``index`` (the cached logs and page maps),
``commits`` (the commit protocol), ``reads`` (heads, pulls, page reads) and
``compaction`` (the checkpoints GC writes). They share one ``Index``, so a commit is
seen by the next read in the same process without a store round trip.
"""

from __future__ import annotations

from graft_server.commits import CHECKPOINT_EVERY, Commits
from graft_server.forks import Forks
from graft_server.history import History
from graft_server.index import Index
from graft_server.limits import MAX_LOADED_VOLUMES
from graft_server.objstore import ObjectStore
from graft_server.reads import Reads
from graft_server.segments import SegmentCache


class Volumes:
    """Every volume in one store: ``index``, ``reads`` and ``commits`` over it.

    ``cache`` (optional) keeps recently read page frames in memory, bounded in bytes;
    the logs of at most ``max_loaded`` volumes stay loaded.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        cache: SegmentCache | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        max_loaded: int = MAX_LOADED_VOLUMES,
    ) -> None:
        self.store = store
        self.index = Index(store, max_loaded=max_loaded)
        self.reads = Reads(self.index, cache)
        self.commits = Commits(self.index, checkpoint_every)
        self.history = History(self.index)
        self.forks = Forks(self.index)
