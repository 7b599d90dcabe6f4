"""Types are checked, not hoped for: mypy passes on the checked paths, and both packages
ship ``py.typed`` so that the types reach their users."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
# What mypy checks, with the settings of pyproject.toml (strict on graft_vfs.core): the
# whole product.
CHECKED_PATHS = ("graft_vfs", "server/graft_server")
PACKAGES = ("graft_vfs", "graft_server")


def test_mypy_passes():
    command = ["mypy", "--config-file", "pyproject.toml"]
    proc = subprocess.run(
        [sys.executable, "-m", *command, *CHECKED_PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_ships_py_typed(package):
    assert importlib.resources.files(package).joinpath("py.typed").is_file()
