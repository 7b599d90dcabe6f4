"""The command line of the server: ``python -m server --store STORE [--host H] [--port P]``."""

from __future__ import annotations

import click

from graft_vfs.errors import GraftError
from server.app import serve


@click.command()
@click.option(
    "--store",
    required=True,
    envvar="GRAFT_STORE",
    help="Where volumes live: a directory, a file:// URL, s3://bucket/prefix, "
    "or memory:// (lost on exit).",
)
@click.option(
    "--s3-endpoint",
    envvar="GRAFT_S3_ENDPOINT",
    default=None,
    help="URL of an S3-compatible service for s3:// stores (MinIO, R2, Tigris); default AWS S3.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=3000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port to listen on; 0 picks a free one (printed at startup).",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="uvicorn's log level.",
)
@click.option(
    "--tokens",
    "tokens_file",
    envvar="GRAFT_TOKENS_FILE",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Token file: requests then need a bearer token in scope (env: GRAFT_TOKENS_FILE).",
)
def main(
    store: str,
    s3_endpoint: str | None,
    host: str,
    port: int,
    log_level: str,
    tokens_file: str | None,
) -> None:
    """Serve graft volumes over HTTP; prints 'graft server listening on URL' when ready."""
    try:
        serve(
            store,
            host=host,
            port=port,
            log_level=log_level,
            s3_endpoint=s3_endpoint,
            tokens_file=tokens_file,
        )
    except (GraftError, OSError) as exc:  # a bad store or an address in use: no traceback
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
