"""``python -m graft_server``: the same command as ``graft server``, with the same options."""

from __future__ import annotations

from graft_vfs.cli import server

if __name__ == "__main__":
    server(prog_name="python -m graft_server")
