"""Editing the token file with ``graft token``: concurrent edits, bad folders, JSON shapes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

from server.auth import create_token, describe_entries, load_entries, revoke_token

ROUNDS = 20
EDITORS = 4  # processes editing the file at the same moment in each round


def _edit(path: str, name: str, barrier, revoke: str | None) -> None:
    barrier.wait()
    if revoke is not None:
        revoke_token(path, revoke)
    else:
        create_token(path, name, ["orders*"], "read")


def test_concurrent_creates_and_revokes_lose_no_update(tmp_path) -> None:
    """Every round, some processes create tokens while others revoke: every edit lands."""
    path = str(tmp_path / "tokens.json")
    ctx = multiprocessing.get_context("fork")
    lost = []
    for r in range(ROUNDS):
        doomed = [f"old-{r}-{i}" for i in range(EDITORS // 2)]
        for name in doomed:
            create_token(path, name, ["x"], "read")
        barrier = ctx.Barrier(EDITORS)
        editors = [
            ctx.Process(target=_edit, args=(path, f"new-{r}-{i}", barrier, None))
            for i in range(EDITORS // 2)
        ] + [ctx.Process(target=_edit, args=(path, "", barrier, name)) for name in doomed]
        for p in editors:
            p.start()
        for p in editors:
            p.join(timeout=60)
            assert p.exitcode == 0
        names = {e["name"] for e in load_entries(path)}
        lost += [n for n in doomed if n in names]
        lost += [f"new-{r}-{i}" for i in range(EDITORS // 2) if f"new-{r}-{i}" not in names]
    assert lost == []


def graft(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    return subprocess.run(
        [sys.executable, "-m", "graft_vfs.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_token_create_into_a_missing_folder_is_a_one_line_error(tmp_path) -> None:
    path = str(tmp_path / "missing" / "tokens.json")
    proc = graft("token", "create", "--name", "a", "--volumes", "x", "--access", "read",
                 "--file", path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"folder {tmp_path / 'missing'} does not exist" in proc.stderr
    assert not (tmp_path / "missing").exists()


def test_token_list_shows_volumes_as_a_list_and_keeps_non_ascii(tmp_path) -> None:
    path = str(tmp_path / "tokens.json")
    for name, globs in (("one", ["café*"]), ("two", ["a*", "b*"])):
        args = [a for g in globs for a in ("--volumes", g)]
        proc = graft("token", "create", "--name", name, *args, "--access", "read",
                     "--file", path)
        assert proc.returncode == 0, proc.stderr
    # A file written by hand (or by an older graft) may hold one glob as a string.
    with open(path) as f:
        data = json.load(f)
    data["tokens"].append({**data["tokens"][0], "name": "three", "volumes": "c*"})
    with open(path, "w") as f:
        json.dump(data, f)
    proc = graft("token", "list", "--file", path)
    assert proc.returncode == 0, proc.stderr
    assert '"café*"' in proc.stdout
    listed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["name"], e["volumes"]) for e in listed] == [
        ("one", ["café*"]),
        ("two", ["a*", "b*"]),
        ("three", ["c*"]),
    ]
    assert describe_entries(path) == listed
