"""The ``graft`` command line: run the server, move databases in and out, query, sync."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from graft_server import limits
from graft_vfs.core.errors import GraftError, VolumeNotFound

# The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

S3_ENDPOINT = click.option(
    "--s3-endpoint",
    envvar="GRAFT_S3_ENDPOINT",
    default=None,
    help="URL of an S3-compatible service for s3:// stores (MinIO, R2, Tigris); "
    "default AWS S3 (env: GRAFT_S3_ENDPOINT).",
)


def _retention_options(grace_flag: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The GC retention options shared by ``graft gc`` and ``graft server``."""
    options = [
        click.option(
            "--retain-lsns",
            type=click.IntRange(min=1),
            default=None,
            help="GC keeps the last N LSNs readable.",
        ),
        click.option(
            "--retain-seconds",
            type=click.FloatRange(min=0),
            default=None,
            help="GC keeps every LSN that was the latest within the last T seconds.",
        ),
        click.option(
            grace_flag,
            type=click.FloatRange(min=0),
            default=900.0,
            show_default=True,
            help="Seconds an unreachable segment must stay unreachable before GC deletes it.",
        ),
    ]

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


REMOTE = click.option(
    "--remote",
    envvar="GRAFT_REMOTE",
    required=True,
    help="Graft server URL, e.g. http://127.0.0.1:3000 (env: GRAFT_REMOTE).",
)
REMOTE_OPTIONAL = click.option(
    "--remote",
    envvar="GRAFT_REMOTE",
    default=None,
    help="Graft server URL (env: GRAFT_REMOTE); without it only the local cache is used.",
)
TOKEN = click.option(
    "--token",
    envvar="GRAFT_TOKEN",
    default=None,
    help="Bearer token for a server that requires one (env: GRAFT_TOKEN, which keeps it "
    "out of the process list).",
)
CACHE_DIR = click.option(
    "--cache",
    "cache_dir",
    envvar="GRAFT_CACHE_DIR",
    default=os.path.join(os.path.expanduser("~"), ".cache", "graft"),
    show_default=True,
    help="Local cache directory (env: GRAFT_CACHE_DIR).",
)
_CACHE_MAX_KEY = "graft.cache_max"  # where --cache-max leaves its value in click's context
CACHE_MAX = click.option(
    "--cache-max",
    envvar="GRAFT_CACHE_MAX",
    default=None,
    expose_value=False,  # read by _cache_max(), so the commands' signatures stay as they are
    callback=lambda ctx, param, value: ctx.meta.__setitem__(
        _CACHE_MAX_KEY, None if value is None else parse_size(value, "--cache-max")
    ),
    help="Most page data the local cache keeps, e.g. 512MiB: clean pages are evicted least "
    "recently used first, unpushed ones never (env: GRAFT_CACHE_MAX; default: no limit).",
)


AT = click.option(
    "--at",
    "at",
    default=None,
    metavar="TIME",
    help="The latest LSN committed at or before TIME: ISO 8601 (2026-11-30T12:00:00Z) or "
    "a time ago (90s, 5m, 2h, 7d); read-only. Needs --remote.",
)


def _lsn_at(volume: str, at: str, remote: str | None, token: str | None) -> int:
    """The LSN ``--at TIME`` names, asked of the server."""
    from graft_vfs.client.remote import Remote
    from graft_vfs.client.when import parse_time

    if not remote:
        raise click.UsageError("--at needs --remote: commit times are on the server")
    try:
        when = parse_time(at)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    try:
        return Remote(remote, token=token).lsn_at(volume, when).lsn
    except VolumeNotFound:
        raise click.ClickException(_no_volume(volume, remote, "")) from None


def CACHE(fn: Callable[..., Any]) -> Callable[..., Any]:  # noqa: N802 (an option like the rest)
    """``--cache`` and ``--cache-max``: where the local cache lives and what it may keep."""
    return CACHE_DIR(CACHE_MAX(fn))


def _cache_max() -> int | None:
    return click.get_current_context().meta.get(_CACHE_MAX_KEY)


class Interrupted(click.ClickException):
    """Ctrl-C stopped the command: one line on stderr, exit status 130."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self) -> None:
        super().__init__("interrupted (Ctrl-C); nothing more was done")


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report errors as one line on stderr and exit 1 (130 for Ctrl-C), without a traceback."""
    import apsw

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except BrokenPipeError:
            raise  # the reader of stdout went away (`| head`): not an error to report
        except (GraftError, apsw.Error) as exc:
            # The VFS prefixes its messages for SQLite's sake; "Error: " says it here.
            raise click.ClickException(str(exc).removeprefix("graft: ")) from exc
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from exc

    return wrapper


# What `graft-vfs[server]` adds to the client's dependencies.
SERVER_DEPENDENCIES = ("boto3", "botocore", "starlette", "uvicorn")


def _needs_server_extra(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command that runs the server's code: a missing server dependency is one line."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] not in SERVER_DEPENDENCIES:
                raise
            raise click.ClickException(
                f"{exc.name} is not installed: this command runs the graft server, whose "
                "dependencies come with pip install 'graft-vfs[server]'"
            ) from None

    return wrapper


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True, ensure_ascii=False))


@contextlib.contextmanager
def _progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; elsewhere nothing, so stderr holds only errors."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=max(length, 1), label=label, file=sys.stderr) as bar:
        yield bar.update


# Since click 8.2 a group run without a command raises this, to show its help.
_HELP_AS_ERROR: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Graft(click.Group):
    """The ``graft`` group: every error, usage errors included, is one line on stderr."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except _HELP_AS_ERROR as exc:  # `graft` alone: the help, not an error
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"Error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(f"Error: {Interrupted().format_message()}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # Python would complain again when it flushes stdout at exit.
            sys.stdout = open(os.devnull, "w")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Graft)
@click.version_option(package_name="graft-vfs")
def main() -> None:
    """graft: lazily replicated SQLite volumes on object storage."""


class _OneLineUsageErrors(click.Command):
    """A command whose usage errors are one line on stderr (exit 2), without the usage
    text: a server is started by scripts and service managers, read in logs."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.ctx = None
            raise


# uvicorn's (uvicorn.config.LOG_LEVELS), named here so that every command need not
# import uvicorn; a test keeps the two equal.
_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


@main.command(cls=_OneLineUsageErrors)
@click.option(
    "--store",
    default="./graft-data",
    show_default=True,
    help="Where volumes live: a directory (the default), file:// URL, or s3://bucket/prefix.",
)
@S3_ENDPOINT
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=3000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free port).",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    help="Log level of the server and uvicorn.",
)
@click.option(
    "--cache-size",
    default="256MiB",
    show_default=True,
    help="In-memory cache of page frames, e.g. 64MiB, 1GB, or 0 for none.",
)
@click.option(
    "--gc-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Run a GC pass every N seconds (see graft gc).",
)
@_retention_options("--gc-grace")
@click.option(
    "--tokens",
    "tokens_file",
    envvar="GRAFT_TOKENS_FILE",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Token file (see graft token create): requests then need a bearer token in "
    "scope; without it the server is open (env: GRAFT_TOKENS_FILE).",
)
@click.option(
    "--max-body",
    default="64MiB",
    show_default=True,
    help="Largest request body accepted (larger ones get 413), e.g. 16MiB.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=limits.DEFAULT_HEADER_TIMEOUT,
    show_default=True,
    help="Seconds a connection has to send a request's headers (from its opening or "
    "its previous answer) before it is closed.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=limits.DEFAULT_BODY_TIMEOUT,
    show_default=True,
    help="Seconds a request body has to arrive in full (else 408).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=limits.DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    help="Open connections at most; past it, the one idle longest is closed "
    "(raises the open-file limit as needed).",
)
@click.option(
    "--max-volumes",
    type=click.IntRange(min=1),
    default=limits.MAX_LOADED_VOLUMES,
    show_default=True,
    help="Volumes whose page maps stay in memory (least recently used dropped first).",
)
@click.option(
    "--direct/--no-direct",
    default=False,
    show_default=True,
    help="On an S3 store, let clients GET page frames from S3 with presigned URLs.",
)
@click.option(
    "--direct-endpoint",
    default=None,
    help="The S3 endpoint URL clients reach for direct reads (default: the store's).",
)
@click.option(
    "--direct-expiry",
    type=click.IntRange(min=1, max=limits.MAX_DIRECT_EXPIRY),
    default=limits.DEFAULT_DIRECT_EXPIRY,
    show_default=True,
    help="Seconds a presigned URL of a direct read stays valid.",
)
@click.option(
    "--access-log",
    is_flag=True,
    help="Log one line per request (uvicorn's access log: client, method, path, status).",
)
@_fail_cleanly
@_needs_server_extra
def server(
    store: str,
    s3_endpoint: str | None,
    host: str,
    port: int,
    log_level: str,
    cache_size: str,
    gc_interval: float | None,
    retain_lsns: int | None,
    retain_seconds: float | None,
    gc_grace: float,
    tokens_file: str | None,
    max_body: str,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    max_volumes: int,
    direct: bool,
    direct_endpoint: str | None,
    direct_expiry: int,
    access_log: bool,
) -> None:
    """Run the graft server (stateless: everything is in the store)."""
    from graft_server.gc import Retention
    from graft_server.serve import serve

    serve(
        store,
        host=host,
        port=port,
        log_level=log_level,
        s3_endpoint=s3_endpoint,
        cache_bytes=parse_size(cache_size, "--cache-size"),
        gc_interval=gc_interval,
        retention=Retention(retain_lsns, retain_seconds),
        gc_grace=gc_grace,
        tokens_file=tokens_file,
        max_body=parse_size(max_body, "--max-body"),
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        max_volumes=max_volumes,
        direct=direct,
        direct_endpoint=direct_endpoint,
        direct_expiry=direct_expiry,
        access_log=access_log,
    )


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str, option: str = "--cache-size") -> int:
    """``64MiB`` -> 67108864; a bad size is a usage error that says what is accepted."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise click.BadParameter(
            f"{text!r} is not a size: use a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB)",
            param_hint=option,
        )
    return int(float(m.group(1)) * _UNITS[unit])


@main.command("import")
@click.argument("database", type=click.Path(dir_okay=False))
@click.argument("volume")
@REMOTE
@TOKEN
@click.option("--replace", is_flag=True, help="Commit over an existing volume as its next LSN.")
@_fail_cleanly
def import_(database: str, volume: str, remote: str, token: str | None, replace: bool) -> None:
    """Import a SQLite DATABASE file as VOLUME."""
    from graft_vfs.client.dbfile import import_database
    from graft_vfs.client.remote import Remote

    size = os.path.getsize(database) if os.path.isfile(database) else 0
    with _progress(size // 4096, "reading") as update:
        lsn = import_database(
            Remote(remote, token=token), database, volume, replace=replace, progress=update
        )
    _echo_json({"volume": volume, "lsn": lsn, "pages": size // 4096})


def _no_volume(volume: str, remote: str | None, cache_dir: str) -> str:
    if remote:
        return f"no volume {volume!r} on {remote}"
    return f"no volume {volume!r} in the local cache {cache_dir} (and no --remote to look on)"


@main.command()
@click.argument("volume")
@click.argument("output", type=click.Path(dir_okay=False))
@REMOTE
@TOKEN
@click.option("--lsn", type=int, default=None, help="Export this past LSN (default: latest).")
@AT
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@_fail_cleanly
def export(
    volume: str,
    output: str,
    remote: str,
    token: str | None,
    lsn: int | None,
    at: str | None,
    force: bool,
) -> None:
    """Export VOLUME to a SQLite file OUTPUT (``-``: write the database to stdout)."""
    from graft_vfs.client.dbfile import export_database
    from graft_vfs.client.remote import Remote

    if at is not None:
        if lsn is not None:
            raise click.UsageError("give --lsn or --at, not both")
        lsn = _lsn_at(volume, at, remote, token)

    if output == "-":
        _export_to_stdout(volume, remote, token, lsn)
        return
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise click.ClickException(
            f"cannot write {output}: folder {folder} does not exist; create it first"
        )
    client = Remote(remote, token=token)
    try:
        total = client.snapshot(volume).page_count if lsn is None else 0
    except VolumeNotFound:
        raise click.ClickException(_no_volume(volume, remote, "")) from None
    with _progress(total, "writing") as update:
        got = export_database(client, volume, output, lsn=lsn, overwrite=force, progress=update)
    _echo_json({"volume": volume, "lsn": got, "file": output})


def _export_to_stdout(volume: str, remote: str, token: str | None, lsn: int | None) -> None:
    """``graft export VOLUME -``: the database on stdout, nothing else (errors on stderr)."""
    from graft_vfs.client.dbfile import write_database
    from graft_vfs.client.remote import Remote

    if sys.stdout.isatty():
        raise click.UsageError(
            "OUTPUT - writes a binary database to stdout, which is a terminal: redirect it "
            "(graft export VOLUME - > file.db) or pipe it (| sqlite3 ...)"
        )
    out = sys.stdout.buffer
    try:
        write_database(Remote(remote, token=token), volume, out, lsn=lsn)
    except VolumeNotFound:
        raise click.ClickException(_no_volume(volume, remote, "")) from None
    out.flush()


# ``PRAGMA graft_status`` and friends answer one JSON text in a column named after
# that text; ``--json`` names it after the PRAGMA and prints the object itself.
_GRAFT_PRAGMA = re.compile(r"\s*PRAGMA\s+(?:\w+\s*\.\s*)?(graft_\w+)", re.I)


def _print_rows(cursor: Any, statements: str, as_json: bool, stopped: threading.Event) -> None:
    # interrupt() stops the statement running; between two statements nothing runs,
    # so the next one is refused here instead.
    cursor.exec_trace = lambda *_: not stopped.is_set()
    for row in cursor.execute(statements):
        if not as_json:
            click.echo("|".join("" if v is None else str(_json_value(v)) for v in row))
            continue
        pragma = _GRAFT_PRAGMA.match(cursor.expanded_sql or "")
        if pragma is not None and len(row) == 1 and isinstance(row[0], str):
            obj = {pragma.group(1).lower(): json.loads(row[0])}
        else:
            names = [d[0] for d in cursor.get_description()]
            obj = {n: _json_value(v) for n, v in zip(names, row)}
        click.echo(json.dumps(obj, ensure_ascii=False))


def _interruptible(con: Any, work: Callable[[threading.Event], None]) -> None:
    """Run ``work`` (statements on ``con``) so that Ctrl-C interrupts it.

    SQLite runs a statement without returning to Python, so a SIGINT handler on the
    thread running it would wait for the statement to end. The statement runs on a
    worker thread instead, and the main thread's handler calls ``interrupt()``, which
    SQLite allows from any thread: the statement stops at its next step. ``work``
    gets the event set by Ctrl-C, to refuse statements not started yet.
    """
    failure: list[BaseException] = []
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        work(stopped)  # only the main thread receives signals: nothing to install
        return

    def run() -> None:
        try:
            work(stopped)
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    def on_sigint(signum: int, frame: Any) -> None:
        stopped.set()
        con.interrupt()

    worker = threading.Thread(target=run, name="graft-sql", daemon=True)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        worker.start()
        worker.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    if stopped.is_set():
        raise Interrupted()
    if failure:
        raise failure[0]


@main.command()
@click.argument("volume")
@click.argument("statements")
@REMOTE_OPTIONAL
@CACHE
@TOKEN
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON objects, one a line.")
@click.option(
    "--no-pull",
    is_flag=True,
    help="Answer from the local cache as it is, without pulling the latest snapshot first.",
)
@click.option("--readonly", is_flag=True, help="Open VOLUME read-only: writes are refused.")
@click.option(
    "--lsn",
    type=click.IntRange(min=0),
    default=None,
    help="Query the past LSN N (read-only; nothing is pulled).",
)
@AT
@click.option("--create", is_flag=True, help="Create VOLUME if it does not exist yet.")
@_fail_cleanly
def sql(
    volume: str,
    statements: str,
    remote: str | None,
    cache_dir: str,
    token: str | None,
    as_json: bool,
    no_pull: bool,
    readonly: bool,
    lsn: int | None,
    at: str | None,
    create: bool,
) -> None:
    """Run SQL STATEMENTS on VOLUME and print the rows; writes are pushed before exit.

    With a remote, VOLUME is pulled first, so the answer is the server's latest; a
    pull that fails is an error (--no-pull answers from the local cache instead).
    """

    import graft_vfs

    if at is not None:
        if lsn is not None:
            raise click.UsageError("give --lsn or --at, not both")
        lsn = _lsn_at(volume, at, remote, token)
    if create and (readonly or lsn is not None):
        raise click.UsageError("--create cannot be combined with --readonly, --lsn or --at")
    con = _connect_for_sql(volume, remote, cache_dir, token, readonly, lsn, create)
    name = con.open_vfs
    try:
        vol = graft_vfs.runtime_of(name).volume(volume, create=False)
        if remote and lsn is None and not no_pull:
            _pull_before_reading(vol, remote)
        before = vol.refresh().local_lsn
        try:
            _interruptible(con, lambda stop: _print_rows(con.cursor(), statements, as_json, stop))
        finally:
            wrote = vol.refresh().local_lsn != before
        if remote and wrote:
            try:
                vol.sync.push()
            except GraftError as exc:
                raise click.ClickException(
                    f"the write is committed in the local cache but was not pushed: {exc}; "
                    "`graft push` sends it later"
                ) from exc
    finally:
        con.close()
        graft_vfs.unregister(name)  # so nothing is pushed at exit behind the user's back


@main.command()
@click.argument("volume")
@REMOTE_OPTIONAL
@CACHE
@TOKEN
@click.option("--readonly", is_flag=True, help="Open VOLUME read-only: writes are refused.")
@click.option(
    "--lsn",
    type=click.IntRange(min=0),
    default=None,
    help="Open the past LSN N (read-only; nothing is pulled).",
)
@click.option("--create", is_flag=True, help="Create VOLUME if it does not exist yet.")
@click.option(
    "--file",
    "script",
    type=click.File("r"),
    default=None,
    help="Run the SQL and dot-commands of this file, then exit (as with a pipe on stdin).",
)
@_fail_cleanly
def shell(
    volume: str,
    remote: str | None,
    cache_dir: str,
    token: str | None,
    readonly: bool,
    lsn: int | None,
    create: bool,
    script: Any,
) -> None:
    """An interactive SQL shell on VOLUME: the sqlite3 shell's dot-commands and output
    modes, Ctrl-C cancels the running statement, and .graft status|pull|push|log.

    Without a terminal it runs the SQL on stdin (or --file) and exits (1 if any input
    failed). With a remote, VOLUME is pulled first; writes are pushed at exit.
    """
    import apsw

    import graft_vfs
    from graft_vfs.shell import GraftShell, run

    if create and (readonly or lsn is not None):
        raise click.UsageError("--create cannot be combined with --readonly or --lsn")
    con = _connect_for_sql(volume, remote, cache_dir, token, readonly, lsn, create)
    name = con.open_vfs
    try:
        vol = graft_vfs.runtime_of(name).volume(volume, create=False)
        if remote and lsn is None:
            _pull_before_reading(vol, remote)
        before = vol.refresh().local_lsn
        where = remote or f"local cache {cache_dir}"
        at = f"LSN {lsn} (read-only)" if lsn is not None else f"local LSN {before}"
        intro = (
            f"graft shell on {volume} ({at}, {where}); SQLite {apsw.sqlite_lib_version()}\n"
            'Enter ".help" for the dot-commands, ".graft status|pull|push|log" for sync\n'
        )
        shell = GraftShell(con, volume, remote, token, stdin=script)
        exit_status = run(shell, intro)
        if remote and vol.refresh().local_lsn != before and vol.status()["pending_push"]:
            try:
                vol.sync.push()
            except GraftError as exc:
                raise click.ClickException(
                    f"the writes are committed in the local cache but were not pushed: {exc}; "
                    "`graft push` sends them later"
                ) from exc
    finally:
        con.close()  # closing twice (after .close or .open) is harmless
        graft_vfs.unregister(name)  # so nothing is pushed at exit behind the user's back
    sys.exit(exit_status)


def _connect_for_sql(
    volume: str,
    remote: str | None,
    cache_dir: str,
    token: str | None,
    readonly: bool,
    lsn: int | None,
    create: bool,
) -> Any:
    """The connection of `graft sql` and `graft shell`; a missing volume is one line."""
    import apsw

    import graft_vfs

    try:
        return graft_vfs.connect(
            volume,
            remote=remote,
            cache_dir=cache_dir,
            readonly=readonly,
            lsn=lsn,
            create=create,
            # The command pushes what it wrote itself, and nothing else: a read must
            # not fail, nor wait, because of earlier commits that cannot be pushed.
            options=graft_vfs.Options(token=token, autopush=False, cache_max_bytes=_cache_max()),
        )
    except apsw.CantOpenError as exc:
        if isinstance(exc.__cause__, VolumeNotFound):
            hint = "" if readonly or lsn is not None else "; --create creates it"
            raise click.ClickException(_no_volume(volume, remote, cache_dir) + hint) from None
        raise


def _pull_before_reading(vol: Any, remote: str) -> None:
    try:
        vol.sync.pull()
    except GraftError as exc:
        if isinstance(exc, VolumeNotFound) and vol.refresh().remote_lsn == 0:
            return  # created here and never pushed: nothing on the server to pull yet
        raise click.ClickException(
            f"cannot pull {vol.vid!r} from {remote}, so the answer could be stale: {exc}; "
            "--no-pull answers from the local cache as it is"
        ) from exc


def _json_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    return v


def _open_volume(volume: str, remote: str | None, cache_dir: str, token: str | None) -> Any:
    from graft_vfs.client.runtime import Options, Runtime

    # No background push: each command does what it says and nothing else.
    options = Options(token=token, autopush=False, cache_max_bytes=_cache_max())
    runtime = Runtime(remote, cache_dir, options)
    try:
        return runtime, runtime.volume(volume, create=False)
    except VolumeNotFound:
        runtime.close()
        raise click.ClickException(_no_volume(volume, remote, cache_dir)) from None
    except BaseException:
        runtime.close()
        raise


@main.command()
@click.argument("volume")
@REMOTE_OPTIONAL
@CACHE
@TOKEN
@_fail_cleanly
def status(volume: str, remote: str | None, cache_dir: str, token: str | None) -> None:
    """Show VOLUME's sync state in the local cache (JSON); server_lsn needs --remote."""
    runtime, vol = _open_volume(volume, remote, cache_dir, token)
    try:
        out = vol.status()
        out["server_lsn"] = runtime.require_remote().snapshot(volume).lsn if remote else None
        _echo_json(out)
    finally:
        runtime.close()


def _sync_command(name: str, doc: str, *options: Any) -> None:
    @main.command(name=name, help=doc)
    @click.argument("volume")
    @REMOTE
    @CACHE
    @TOKEN
    @_fail_cleanly
    def command(volume: str, remote: str, cache_dir: str, token: str | None, **flags: Any) -> None:
        runtime, vol = _open_volume(volume, remote, cache_dir, token)
        try:
            _echo_json(getattr(vol.sync, name)(**flags))
        finally:
            runtime.close()

    for option in options:
        option(command)


@main.command()
@click.argument("volume")
@REMOTE
@CACHE
@TOKEN
@_fail_cleanly
def hydrate(volume: str, remote: str, cache_dir: str, token: str | None) -> None:
    """Fetch every page of VOLUME's latest snapshot into the local cache."""
    runtime, vol = _open_volume(volume, remote, cache_dir, token)
    try:
        total = vol.snapshot[1]
        with _progress(total, "hydrating") as update:
            _echo_json(vol.hydrate(progress=update))
    finally:
        runtime.close()


@main.command()
@click.argument("volume")
@click.option(
    "--table",
    "tables",
    multiple=True,
    required=True,
    help="A table or index whose B-tree to fetch (repeat for several).",
)
@REMOTE
@CACHE
@TOKEN
@_fail_cleanly
def prefetch(
    volume: str, tables: tuple[str, ...], remote: str, cache_dir: str, token: str | None
) -> None:
    """Fetch every page of some tables and indexes of VOLUME's latest snapshot."""
    from graft_vfs.client.pragmas import prefetch as prefetch_trees

    runtime, vol = _open_volume(volume, remote, cache_dir, token)
    try:
        with _progress(vol.snapshot[1], "prefetching") as update:
            walked = 0

            def progress(done: int, known: int) -> None:
                nonlocal walked
                bar = getattr(update, "__self__", None)  # click's bar: its length grows
                if bar is not None:
                    bar.length = max(known, 1)
                update(done - walked)
                walked = done

            _echo_json(prefetch_trees(vol, list(tables), progress))
    finally:
        runtime.close()


_sync_command("pull", "Pull VOLUME's latest snapshot from the server (changed-page bitmap only).")
_sync_command("push", "Push VOLUME's local commits to the server as one commit.")
_sync_command(
    "reset",
    "Discard VOLUME's unpushed local commits and take the server's latest.",
    click.option(
        "--force",
        is_flag=True,
        help="Also when the server's volume is another one than the cache's (created "
        "again, or another server): its unpushed commits are discarded.",
    ),
)


@main.command()
@click.option(
    "--store",
    required=True,
    help="The store to collect: a directory, file:// URL, or s3://bucket/prefix.",
)
@S3_ENDPOINT
@_retention_options("--grace")
@_fail_cleanly
@_needs_server_extra
def gc(
    store: str,
    s3_endpoint: str | None,
    retain_lsns: int | None,
    retain_seconds: float | None,
    grace: float,
) -> None:
    """Compact and garbage-collect a store; without --retain-* all history is kept."""
    from graft_server.gc import Retention, collect
    from graft_server.objstore import open_store
    from graft_server.volumes import Volumes

    report = collect(
        Volumes(open_store(store, s3_endpoint)), Retention(retain_lsns, retain_seconds), grace=grace
    )
    _echo_json(report.as_dict())


TOKENS_FILE = click.option(
    "--file",
    "path",
    envvar="GRAFT_TOKENS_FILE",
    required=True,
    type=click.Path(dir_okay=False),
    help="The token file the server reads with --tokens (env: GRAFT_TOKENS_FILE).",
)


@main.group()
def token() -> None:
    """Manage the server's bearer tokens (a file of hashes; see graft server --tokens)."""


@token.command("create")
@click.option("--name", required=True, help="A label for the token, in logs and errors.")
@click.option(
    "--volumes",
    "globs",
    required=True,
    multiple=True,
    help="Volumes the token may use: a glob such as 'orders*' (repeat for several).",
)
@click.option(
    "--access",
    required=True,
    type=click.Choice(["read", "write"]),
    help="read: open, pull, export; write: also commit and push.",
)
@TOKENS_FILE
@_fail_cleanly
def token_create(name: str, globs: tuple[str, ...], access: str, path: str) -> None:
    """Create a token, print it once, and store only its hash in the file."""
    from graft_server.auth import create_token

    secret = create_token(path, name, globs, access)
    click.echo(secret)  # stdout holds only the token, for TOKEN=$(graft token create ...)
    click.echo(
        f"token {name!r} ({access} access to {', '.join(globs)}) added to {path}; "
        "it is shown only this once",
        err=True,
    )


@token.command("list")
@TOKENS_FILE
@_fail_cleanly
def token_list(path: str) -> None:
    """List the tokens in the file (names and scopes; never tokens or hashes) as JSON lines."""
    from graft_server.auth import describe_entries

    for entry in describe_entries(path):
        _echo_json(entry)


@token.command("revoke")
@click.option("--name", required=True, help="The token to remove.")
@TOKENS_FILE
@_fail_cleanly
def token_revoke(name: str, path: str) -> None:
    """Remove a token from the file; a running server stops accepting it within a second."""
    from graft_server.auth import revoke_token

    revoke_token(path, name)
    click.echo(f"token {name!r} removed from {path}", err=True)


@main.command()
@REMOTE
@TOKEN
@_fail_cleanly
def volumes(remote: str, token: str | None) -> None:
    """List the volumes on the server that the token may read (JSON)."""
    from graft_vfs.client.remote import Remote

    _echo_json(
        [
            {"volume": v["vid"], "lsn": v["lsn"], "page_count": v["page_count"]}
            for v in Remote(remote, token=token).list_volumes()
        ]
    )


@main.command()
@click.argument("source")
@click.argument("volume")
@REMOTE
@CACHE
@TOKEN
@click.option("--lsn", type=click.IntRange(min=1), default=None, help="Fork this LSN of SOURCE.")
@AT
@click.option(
    "--local",
    is_flag=True,
    help="Fork what the cache has of SOURCE: the LSN its unpushed commits are based on, "
    "plus those commits (a diverged volume keeps its work).",
)
@_fail_cleanly
def fork(
    source: str,
    volume: str,
    remote: str,
    cache_dir: str,
    token: str | None,
    lsn: int | None,
    at: str | None,
    local: bool,
) -> None:
    """Create VOLUME as a zero-copy fork of SOURCE at its latest LSN (or --lsn, --at).

    No page is copied: VOLUME's LSN 1 names SOURCE's frames. It then lives its own
    life: commits, pulls, forks of its own (JSON: volume, lsn, source, source_lsn).
    With --local, the fork also carries the cache's unpushed commits of SOURCE.
    """
    from graft_vfs.client.remote import Remote

    if local:
        if lsn is not None or at is not None:
            raise click.UsageError("--local forks the cache's own snapshot: no --lsn or --at")
        runtime, vol = _open_volume(source, remote, cache_dir, token)
        try:
            _echo_json(vol.sync.fork(volume))
        finally:
            runtime.close()
        return
    if at is not None:
        if lsn is not None:
            raise click.UsageError("give --lsn or --at, not both")
        lsn = _lsn_at(source, at, remote, token)
    try:
        forked = Remote(remote, token=token).fork(source, volume, lsn)
    except VolumeNotFound:
        raise click.ClickException(_no_volume(source, remote, "")) from None
    _echo_json(
        {
            "volume": forked.vid,
            "lsn": 1,
            "source": forked.source,
            "source_lsn": forked.source_lsn,
            "page_count": forked.page_count,
        }
    )


@main.command()
@click.argument("volume")
@REMOTE
@TOKEN
@click.option("--yes", is_flag=True, help="Delete without asking (needed without a terminal).")
@_fail_cleanly
def delete(volume: str, remote: str, token: str | None, yes: bool) -> None:
    """Delete VOLUME on the server: the name disappears at once (later reads are
    volume_not_found); GC frees its segments once no volume, no fork, names them."""
    from graft_vfs.client.remote import Remote

    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("give --yes to delete a volume without a terminal to ask on")
        click.confirm(f"Delete {volume!r} on {remote}? Its history goes too", abort=True)

    try:
        lsn = Remote(remote, token=token).delete(volume)
    except VolumeNotFound:
        raise click.ClickException(_no_volume(volume, remote, "")) from None
    _echo_json({"volume": volume, "deleted": True, "lsn": lsn})


@main.command()
@click.argument("volume")
@REMOTE
@TOKEN
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Show at most this many commits.",
)
@click.option(
    "--before",
    type=click.IntRange(min=1),
    default=None,
    help="Start below this LSN (default: from the latest).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object a commit.")
@_fail_cleanly
def log(
    volume: str, remote: str, token: str | None, limit: int, before: int | None, as_json: bool
) -> None:
    """Show VOLUME's commits on the server, newest first: LSN, time, pages and bytes.

    It reads log records only (never segments), and stops at the oldest commit GC kept.
    """
    from datetime import datetime, timezone

    from graft_vfs.client.remote import Remote

    try:
        commits = Remote(remote, token=token).history(volume, before, limit)
    except VolumeNotFound:
        raise click.ClickException(_no_volume(volume, remote, "")) from None
    for c in commits:
        stamp = datetime.fromtimestamp(c.time, timezone.utc).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        origin = None if c.fork_of is None else {"volume": c.fork_of[0], "lsn": c.fork_of[1]}
        if as_json:
            _echo_json({**c._asdict(), "time": stamp, "timestamp": c.time, "fork_of": origin})
        else:
            forked = f"  fork of {origin['volume']} at LSN {origin['lsn']}" if origin else ""
            click.echo(
                f"{c.lsn:>8}  {stamp}  {c.pages:>7} pages  {c.bytes:>10} bytes  "
                f"{c.page_count:>8} pages in all{forked}"
            )


@main.command()
@click.argument("volumes", nargs=-1, required=True)
@REMOTE
@TOKEN
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=3001, show_default=True, help="Port (0: any free).")
@click.option(
    "--cache",
    "cache_dir",
    default=None,
    help="Cache directory (default: a temporary one, removed at exit: the replica is stateless).",
)
@click.option(
    "--pull-interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between background pulls.",
)
@click.option(
    "--tokens",
    "tokens_file",
    default=None,
    help="Token file (graft token create): queries need a token that may read the volume.",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Most rows one answer holds (more: truncated).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.01),
    default=10.0,
    show_default=True,
    help="Seconds a query may run before it is interrupted (408).",
)
@_fail_cleanly
@_needs_server_extra
def replica(
    volumes: tuple[str, ...],
    remote: str,
    token: str | None,
    host: str,
    port: int,
    cache_dir: str | None,
    pull_interval: float,
    tokens_file: str | None,
    max_rows: int,
    timeout: float,
) -> None:
    """Serve read-only SQL on VOLUMES over HTTP: a stateless read replica of REMOTE.

    GET or POST /v1/query with volume, sql, params (JSON), format (json, ndjson, csv),
    min_lsn, max_rows and timeout; every answer says the LSN it read.
    """
    import tempfile

    from graft_server.auth import TokenFile
    from graft_server.serve import serve_app
    from graft_vfs.replica import Replica, create_app

    with tempfile.TemporaryDirectory(prefix="graft-replica-") as scratch:
        served = Replica(
            list(volumes),
            remote,
            cache_dir or scratch,
            token=token,
            pull_interval=pull_interval,
            max_rows=max_rows,
            timeout=timeout,
        )
        try:
            tokens = TokenFile(tokens_file) if tokens_file else None
            serve_app(create_app(served, tokens), host, port, "graft replica listening on ")
        finally:
            served.close()


if __name__ == "__main__":
    main()
