"""Named crash points, so tests can SIGKILL a real process at an exact step.

``GRAFT_CRASH_AT=name[,name...]`` in a process's environment makes it kill itself
with SIGKILL when it reaches one of those points. Unset, a point costs one set
lookup. The names are listed in ``CRASH_POINTS`` and documented in docs/protocol.md.
"""

from __future__ import annotations

import os
import signal

CRASH_POINTS = frozenset(
    {
        # server commit path
        "server.commit.after_segment",  # segment written, log record not yet created
        "server.commit.after_log",  # log record created, response not yet sent
        "server.checkpoint.before_write",  # a checkpoint is due (commit or GC), not written
        # client push path
        "client.push.before_send",  # push intent recorded locally, request not sent
        "client.push.after_segment",  # a push of many pages: one segment uploaded, not all
        "client.push.after_ack",  # server acknowledged, local store not yet updated
        # client local commit path
        "client.commit.before_durable",  # local commit written, its transaction not ended
        "client.commit.after_local",  # local commit durable, SQLite not yet told
        # client pull path
        "client.pull.mid_apply",  # server answered, changed pages marked, not recorded
    }
)

_armed = frozenset(p for p in os.environ.get("GRAFT_CRASH_AT", "").split(",") if p)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is armed in GRAFT_CRASH_AT."""
    if name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
