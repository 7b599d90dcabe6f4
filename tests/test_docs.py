"""The README is checked, not hoped for: commands, PRAGMAs and the Python example."""

from __future__ import annotations

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme() -> str:
    with open(README) as f:
        return f.read()


def test_every_command_and_pragma_is_documented():
    from graft_vfs.cli import main
    from graft_vfs.client.pragmas import PRAGMAS

    text = readme()
    for name, command in main.commands.items():
        assert command.help, f"graft {name} has no help text"
        assert f"graft {name}" in text, f"graft {name} is not in README.md"
    for name in PRAGMAS:
        assert f"PRAGMA {name}" in text, f"PRAGMA {name} is not in README.md"


def test_readme_python_example_runs(server, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", readme(), re.S)
    assert blocks, "README has no Python example"
    code = blocks[0]
    code = code.replace("http://127.0.0.1:3000", server.url)
    code = code.replace("/tmp/graft-cache", str(tmp_path / "a")).replace(
        "/tmp/other-cache", str(tmp_path / "b")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[('hello',)]"  # the replica saw the push


def test_layout_lists_every_module_and_only_what_exists():
    """README's Layout names every module of the product, and nothing that is not there."""
    root = os.path.join(os.path.dirname(__file__), "..")
    section = readme().split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "README's Layout has no listing"
    listed = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    missing = [p for p in listed if not os.path.exists(os.path.join(root, p))]
    assert not missing, f"README's Layout names what does not exist: {missing}"
    modules = []
    for package in ("graft_vfs", os.path.join("server", "graft_server")):
        for folder, _, files in os.walk(os.path.join(root, package)):
            rel = os.path.relpath(folder, root)
            modules += [
                os.path.join(rel, f)
                for f in files
                if f.endswith(".py") and not (f == "__init__.py" and rel != "graft_vfs")
            ]
    unlisted = sorted(m for m in modules if m not in listed)
    assert not unlisted, f"README's Layout does not name: {unlisted}"


def test_every_test_the_readme_names_exists():
    """A guarantee's proof is a test that exists: every tests/ file, and every
    ``file::test`` the README names, is there."""
    import ast

    root = os.path.join(os.path.dirname(__file__), "..")
    text = readme()
    named = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(named) >= 10, "README names the tests behind its guarantees"
    for path, test in named:
        full = os.path.join(root, path)
        assert os.path.isfile(full), f"README names {path}, which does not exist"
        if test:
            with open(full) as f:
                tree = ast.parse(f.read())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert test in defined, f"README names {path}::{test}, which does not exist"
