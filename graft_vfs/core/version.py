"""The version of graft-vfs, defined once (pyproject.toml reads it from here)."""

VERSION = "0.1.0"
