"""The library's shape: no import cycles in mlm/, and a model that depends on nothing but small shared definitions."""

import ast
from pathlib import Path

MLM = Path(__file__).resolve().parents[1] / "mlm"


def mlm_imports(path: Path) -> set[str]:
    """The mlm modules `path` imports (at any depth of the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mlm":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("mlm."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("mlm.")}
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: mlm_imports(path) for path in sorted(MLM.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for dependency in sorted(graph.get(name, ())):
            if cycle := visit(dependency):
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in graph:
        if cycle := visit(name):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_mlm():
    graph = import_graph()
    assert {"model", "train", "lean", "checkpoint", "masking"} <= set(graph)  # the scan sees the package
    assert find_cycle(graph) is None


def test_the_model_imports_only_shared_definitions():
    graph = import_graph()
    assert graph["model"] <= {"constants", "errors"}
    assert "model" not in graph["masking"]
