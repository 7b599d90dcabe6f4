"""Transactions that retry themselves until their commit is on the server.

In the style of FoundationDB's ``@transactional``: the body runs in ``BEGIN IMMEDIATE``,
commits, and is pushed at once (``PRAGMA graft_push``). If another client's commit
landed first (the push is rejected, the volume diverged) or the volume moved on under the
transaction (a pull: ``SQLITE_BUSY`` at ``COMMIT``), the local commit is discarded
(``PRAGMA graft_reset``, which also pulls the server's latest) and the body runs again on
the new snapshot, after a pause (exponential backoff with full jitter), up to a bounded
number of attempts; then ``TransactionConflict``. An exception raised by the body rolls
the transaction back and propagates unchanged, never retried.

Python cannot run a ``with`` block twice, so each attempt is one::

    tx = graft_vfs.transaction(con)
    for attempt in tx:
        with attempt:
            ...body...
    tx.lsn  # the remote LSN the commit landed at

and ``@graft_vfs.transactional`` wraps a function whose first argument is the connection.

The push sends every pending local commit of the volume, and a reset discards them all:
write to a volume through transactions only (``autopush`` may stay on).
"""

from __future__ import annotations

import functools
import json
import random
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar, overload

import apsw

from graft_vfs.core.errors import Diverged, GraftError, IdentityMismatch

DEFAULT_ATTEMPTS = 10
DEFAULT_BACKOFF = 0.01  # seconds: the first retry's pause is at most this
DEFAULT_MAX_BACKOFF = 1.0  # seconds: no pause is longer

_landed: weakref.WeakKeyDictionary[apsw.Connection, int] = weakref.WeakKeyDictionary()
T = TypeVar("T")


class TransactionConflict(GraftError):
    """A transaction's commit conflicted with other writers on every attempt."""


def landed_lsn(con: apsw.Connection) -> int | None:
    """The remote LSN where the last ``transaction``/``transactional`` on ``con`` landed."""
    return _landed.get(con)


def _pragma(con: apsw.Connection, name: str) -> dict[str, Any]:
    row = con.execute(f"PRAGMA {name}").fetchone()
    assert row is not None  # a graft PRAGMA answers one row
    answer: dict[str, Any] = json.loads(row[0])
    return answer


def _diverged(exc: apsw.Error) -> bool:
    """Whether a sync PRAGMA failed because the volume diverged (not another identity)."""
    cause = exc.__cause__
    if isinstance(cause, GraftError):
        return isinstance(cause, Diverged) and not isinstance(cause, IdentityMismatch)
    return isinstance(exc, apsw.SQLError) and " diverged: " in str(exc)


class Attempt:
    """One run of a transaction's body: a context manager, used once."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.entered = False
        self.exited = False

    def __enter__(self) -> Attempt:
        self.entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exited = True
        con = self.tx.con
        if exc is not None:
            self.tx.finished = True
            if con.in_transaction:
                con.execute("ROLLBACK")
            return None  # the body's exception propagates unchanged
        self.tx._finish()


class Transaction:
    """A transaction retried on conflict; iterate it for its attempts (see the module).

    ``lsn`` is the remote LSN the commit landed at once the loop ends (a transaction
    that changed nothing: the remote LSN its snapshot was at). ``attempts`` counts the
    runs of the body, ``conflicts`` says why each retry happened.
    """

    def __init__(
        self,
        con: apsw.Connection,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts={attempts}: give 1 or more")
        if not (0 <= backoff <= max_backoff):
            raise ValueError(
                f"backoff={backoff}, max_backoff={max_backoff}: give 0 <= backoff <= max_backoff"
            )
        self.con = con
        self.max_attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.attempts = 0
        self.conflicts: list[str] = []
        self.lsn: int | None = None
        self.finished = False
        self._retry = False
        self._last_error: BaseException | None = None

    def __iter__(self) -> Iterator[Attempt]:
        if self.attempts or self.finished:
            raise RuntimeError("a Transaction runs once: make a new one")
        if self.con.in_transaction:
            raise RuntimeError(
                "graft_vfs.transaction: the connection is already in a transaction; "
                "commit or roll it back first"
            )
        while not self.finished:
            if self.attempts >= self.max_attempts:
                raise TransactionConflict(
                    f"transaction gave up after {self.attempts} attempt(s): every commit "
                    f"conflicted with another writer (last: {self.conflicts[-1]}); raise "
                    "attempts= or write less concurrently"
                ) from self._last_error
            if self.attempts:
                self._pause()
            self.attempts += 1
            if not self._begin():
                continue
            self._retry = False
            attempt = Attempt(self)
            yield attempt
            if not attempt.exited:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
                raise RuntimeError("use each attempt of a transaction as `with attempt:`")

    def _pause(self) -> None:
        cap = min(self.max_backoff, self.backoff * 2 ** (len(self.conflicts) - 1))
        time.sleep(random.uniform(0, cap))

    def _conflict(self, why: str, exc: BaseException | None) -> None:
        self.conflicts.append(why)
        self._last_error = exc

    def _begin(self) -> bool:
        """BEGIN IMMEDIATE; False (a conflict noted) if the volume is busy or moved on."""
        try:
            self.con.execute("BEGIN IMMEDIATE")
        except apsw.BusyError as exc:
            self._conflict(f"busy at BEGIN: {exc}", exc)
            return False
        return True

    def _finish(self) -> None:
        """After a body that returned: commit, push; a conflict leaves ``finished`` False."""
        con = self.con
        try:
            con.execute("COMMIT")
        except apsw.BusyError as exc:
            # The volume moved on (a pull) since the snapshot: nothing of it committed.
            con.execute("ROLLBACK")
            self._conflict(f"stale snapshot at COMMIT: {exc}", exc)
            return
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        try:
            pushed = _pragma(con, "graft_push")
        except apsw.Error as exc:
            if not _diverged(exc):
                raise  # the commit stays pending locally; the next push sends it
            self._conflict(f"push rejected: {exc}", exc)
            _pragma(con, "graft_reset")  # discard it, take the server's latest
            return
        if pushed["pushed"]:
            self.lsn = pushed["remote_lsn"]
        else:
            # Nothing to push: no change, or a background push sent it first (then this
            # is the latest remote LSN the cache has, which includes the commit).
            status = _pragma(con, "graft_status")
            if status["diverged"]:
                self._conflict("diverged after a background push or pull", None)
                _pragma(con, "graft_reset")
                return
            self.lsn = status["remote_lsn"]
        self.finished = True
        assert self.lsn is not None
        _landed[con] = self.lsn


def transaction(
    con: apsw.Connection,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff: float = DEFAULT_BACKOFF,
    max_backoff: float = DEFAULT_MAX_BACKOFF,
) -> Transaction:
    """A transaction on ``con`` retried on conflict: ``for attempt in tx: with attempt: ...``."""
    return Transaction(con, attempts=attempts, backoff=backoff, max_backoff=max_backoff)


F = TypeVar("F", bound=Callable[..., Any])


@overload
def transactional(fn: F) -> F: ...


@overload
def transactional(
    *, attempts: int = ..., backoff: float = ..., max_backoff: float = ...
) -> Callable[[F], F]: ...


def transactional(
    fn: Callable[..., Any] | None = None,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff: float = DEFAULT_BACKOFF,
    max_backoff: float = DEFAULT_MAX_BACKOFF,
) -> Any:
    """Decorate ``fn(con, ...)`` to run as a ``transaction`` and return its result.

    Called inside an open transaction (from another transactional function), it runs
    as part of that one. ``graft_vfs.landed_lsn(con)`` is where the commit landed.
    """

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def run(con: apsw.Connection, *args: Any, **kwargs: Any) -> Any:
            if con.in_transaction:
                return body(con, *args, **kwargs)
            result = None
            tx = Transaction(con, attempts=attempts, backoff=backoff, max_backoff=max_backoff)
            for attempt in tx:
                with attempt:
                    result = body(con, *args, **kwargs)
            return result

        return run

    return wrap if fn is None else wrap(fn)
