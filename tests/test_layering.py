"""The package's shape: imports run one way, modules stay readable, comments give reasons.

Imports are read from the source (also those inside functions), so a circle that Python
tolerates at run time because one side imports lazily is still caught.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fed_ndif"
MAX_MODULE_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the fed_ndif modules it imports (the package root itself left out)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, base] if base else anchor)
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            else:
                continue
            targets.update(t for t in found if t.startswith("fed_ndif.") and t in modules)
        graph[name] = targets - {name}
    return graph


def _part(module: str) -> str:
    """A subpackage (fed_ndif.data) or a top-level module (fed_ndif.checkpoints)."""
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_modules():
    assert _cycle(_imports()) is None, " -> ".join(_cycle(_imports()) or [])


def test_no_import_circle_between_parts():
    parts: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        parts[_part(module)].update(_part(t) for t in targets if _part(t) != _part(module))
    assert _cycle(parts) is None, " -> ".join(_cycle(parts) or [])


def test_the_finder_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_run_one_way():
    graph = _imports()
    forbidden = {
        "fed_ndif.training": ("fed_ndif.evaluation", "fed_ndif.client", "fed_ndif.server"),
        "fed_ndif.models": ("fed_ndif.data", "fed_ndif.training", "fed_ndif.checkpoints"),
        "fed_ndif.inference": ("fed_ndif.training", "fed_ndif.evaluation"),
        "fed_ndif.evaluation": ("fed_ndif.training",),
        "fed_ndif.client": ("fed_ndif.data.sites", "fed_ndif.data.phantom",
                            "fed_ndif.data.scanner", "fed_ndif.data.dicom"),
    }
    for module, targets in graph.items():
        for source, banned in forbidden.items():
            if module == source or module.startswith(source + "."):
                bad = sorted(t for t in targets if t.startswith(banned))
                assert not bad, f"{module} imports {bad}"


def test_modules_are_small_enough_to_read():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_tracker_references_in_code_or_configs():
    pattern = re.compile(r"\bissues? #?\d+|#\d+\b", re.IGNORECASE)
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "configs").rglob("*.yaml")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
