"""The layers of docs/architecture.md, checked on the source: who may import whom.

core (graft_vfs.core) imports nothing of ours above it; the client (graft_vfs.client)
and the server (graft_server) import the core and themselves, never each other; the
command line (graft_vfs.cli, graft_vfs.demo, graft_vfs.sample, graft_vfs itself) sits
above both and loads the server only inside the commands that run it. No module of the
product or of the tests is part of an import circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"graft_vfs": ROOT / "graft_vfs", "graft_server": ROOT / "server" / "graft_server"}
# The server's defaults, constants without imports, shown in `graft server --help`.
CLI_MAY_IMPORT_AT_LOAD = {"graft_server.limits"}


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def layer(name: str) -> str:
    if name == "graft_vfs.core" or name.startswith("graft_vfs.core."):
        return "core"
    if name == "graft_vfs.client" or name.startswith("graft_vfs.client."):
        return "client"
    if name == "graft_server.__main__":
        return "command"  # `python -m graft_server` is `graft server`
    if name == "graft_server" or name.startswith("graft_server."):
        return "server"
    return "command"  # graft_vfs itself, cli, demo, sample


ALLOWED = {
    "core": {"core"},
    "client": {"core", "client"},
    "server": {"core", "server"},
    "command": {"core", "client", "server", "command"},
}


def imports(path: Path, name: str, *, top_level_only: bool) -> set[str]:
    """The modules of ours that ``name`` imports (resolved to a known module)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also under `if` (TYPE_CHECKING too) and `try`, not in functions
        nodes = [n for stmt in tree.body for n in _module_level(stmt)]
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from package import module` imports the module; `from module import name`
            # the module.
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _module_level(stmt: ast.stmt) -> list[ast.AST]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return []
    out: list[ast.AST] = [stmt]
    for child in ast.iter_child_nodes(stmt):
        if isinstance(child, ast.stmt):
            out += _module_level(child)
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name: str) -> None:
    path = MODULES[name]
    mine = layer(name)
    wrong = {t for t in imports(path, name, top_level_only=False) if layer(t) not in ALLOWED[mine]}
    assert not wrong, f"{name} ({mine}) imports {sorted(wrong)}"
    if mine == "command":
        at_load = imports(path, name, top_level_only=True)
        servers = {t for t in at_load if layer(t) == "server"} - CLI_MAY_IMPORT_AT_LOAD
        assert not servers, f"{name} loads the server at import time: {sorted(servers)}"


def test_no_import_circles() -> None:
    tests = {
        f"tests.{p.relative_to(ROOT / 'tests').with_suffix('').as_posix().replace('/', '.')}": p
        for p in (ROOT / "tests").rglob("*.py")
    }
    graph = {n: imports(p, n, top_level_only=True) for n, p in MODULES.items()}
    for name, path in tests.items():
        graph[name] = _test_imports(path, tests)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _test_imports(path: Path, tests: dict[str, Path]) -> set[str]:
    # Tests import each other and tests/support by their names under tests/.
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for module in names:
            for candidate in (f"tests.{module}", module):
                if candidate in tests or candidate in MODULES:
                    found.add(candidate)
    return found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_layer_rules_see_imports() -> None:
    """The checks above can fail: the known imports of two modules are found."""
    assert "graft_vfs.core.segment" in imports(
        MODULES["graft_server.segments"], "graft_server.segments", top_level_only=True
    )
    assert layer("graft_vfs.client.vfs") == "client" and layer("graft_server.app") == "server"
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
