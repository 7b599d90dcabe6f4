"""``python -m graft_vfs`` is the ``graft`` command."""

from graft_vfs.cli import main

if __name__ == "__main__":
    main(prog_name="graft")
