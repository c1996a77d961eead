"""The layers import one way: pinecall_sdk <- conversations <- dashboard, with no cycles.

Read from the source with `ast` (nothing imported), so a violation fails here
whatever the tests exercise. Function-level imports of our own modules are
refused too: they are how a cycle hides.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pinecall_sdk", "conversations", "dashboard")
# Who may import whom (a package always imports itself).
ALLOWED = {
    "pinecall_sdk": set(),
    "conversations": {"pinecall_sdk"},
    "dashboard": {"conversations", "pinecall_sdk"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for each first-party import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    typing_only: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If):
            inside = {id(child) for child in ast.walk(node)}
            if "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only |= inside  # never imported at run time
            else:
                top_level |= inside  # a conditional import at the top is module level
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # `from . import x` imports x, not the package it sits in.
            names = [source] if node.module else []
            names += [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if first_party(name):
                found.append((name, id(node) in top_level))
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def graph() -> tuple[dict[str, set[str]], list[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    late: list[str] = []
    for module, path in known.items():
        for name, at_top in imports_of(path, module):
            target = resolve(name, known)
            if target is None or target == module:
                continue
            edges[module].add(target)
            # Django's ready() hooks must import late; the management commands too.
            allowed_late = path.name == "apps.py" or "management" in path.parts
            if not at_top and not allowed_late:
                late.append(f"{module} imports {target} inside a function")
    return edges, late


def test_no_layer_imports_a_layer_above_it():
    edges, _ = graph()
    wrong = [
        f"{source} imports {target}"
        for source, targets in edges.items()
        for target in targets
        if target.split(".")[0] != source.split(".")[0]
        and target.split(".")[0] not in ALLOWED[source.split(".")[0]]
    ]
    assert wrong == []


def test_the_domain_never_imports_the_web_layer():
    edges, _ = graph()
    assert not [
        (s, t) for s, t_set in edges.items() for t in t_set
        if s.startswith("conversations") and t.startswith("dashboard")
    ]


def test_no_import_cycles():
    edges, _ = graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target] if target in trail else [node, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own submodules is not a cycle of layers.
    real = [c for c in cycles if not any(m in PACKAGES for m in c)]
    assert real == []


def test_no_function_level_imports_of_our_own_modules():
    _, late = graph()
    assert late == []
