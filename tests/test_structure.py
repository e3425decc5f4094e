"""The library's shape: no import cycles in mlm/, and a model that depends on nothing but small shared definitions."""

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLM = ROOT / "mlm"


def module_name(path: Path) -> str:
    """mlm/run/folder.py -> "run.folder"; mlm/model.py -> "model"."""
    return ".".join(path.relative_to(MLM).with_suffix("").parts)


def mlm_imports(path: Path, modules: set[str]) -> set[str]:
    """The mlm modules `path` imports (at any depth of the file, lazy imports included), as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlm":
            package = node.module.removeprefix("mlm").removeprefix(".")
            for alias in node.names:  # `from mlm.speed import lean_ops` imports a module; `from mlm.x import f`, x
                candidate = f"{package}.{alias.name}".lstrip(".")
                found.add(candidate if candidate in modules else package)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("mlm.") for alias in node.names if alias.name.startswith("mlm.")}
    return found - {module_name(path), ""}


def import_graph() -> dict[str, set[str]]:
    paths = [path for path in sorted(MLM.rglob("*.py")) if path.name != "__init__.py"]
    modules = {module_name(path) for path in paths}
    return {module_name(path): mlm_imports(path, modules) for path in paths}


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
    assert {"model", "train", "speed.lean", "files.pretrained", "masking", "run.folder"} <= set(graph)  # all seen
    assert find_cycle(graph) is None


def test_the_model_imports_only_shared_definitions():
    graph = import_graph()
    assert graph["model"] <= {"constants", "errors"}
    assert "model" not in graph["masking"]


def test_the_run_layer_never_imports_the_loop():
    """Arrows run one way: the loop calls the run layer (mlm/run/), which gets the settings as data."""
    graph = import_graph()
    run_modules = [name for name in graph if name.startswith("run.")]
    assert run_modules
    for name in run_modules:
        assert "train" not in graph[name], f"mlm/{name.replace('.', '/')}.py imports the training loop"
        assert not {dep for dep in graph[name] if dep.startswith("cli")}, name


def test_the_chapter_does_not_depend_on_the_machinery():
    """model, masking, data and evaluate read on their own: none imports the run layer or the speed layer."""
    graph = import_graph()
    for name in ("model", "masking", "data", "evaluate", "optim", "tokenizer", "fill_mask"):
        machinery = {dep for dep in graph[name] if dep.startswith(("run.", "speed.", "cli."))}
        assert not machinery, f"mlm/{name}.py imports {sorted(machinery)}"


def test_the_readme_module_map_lists_every_module():
    """The README's module map mirrors the folders: a module added or moved without its row fails here."""
    readme = (MLM.parent / "README.md").read_text(encoding="utf-8")
    modules = [path.relative_to(MLM.parent).as_posix() for path in sorted(MLM.rglob("*.py"))
               if path.name != "__init__.py"]
    missing = [module for module in modules if f"| `{module}` |" not in readme]
    assert not missing, f"README.md's module map lacks {missing}"


def test_every_mlm_name_the_benches_scripts_and_examples_import_exists():
    """bench/ and scripts/reference/ are run by hand, their cases partly as code strings for subprocesses: a name
    moved or renamed in mlm/ would only fail there, at the next measurement."""
    statement = re.compile(r"^\s*from (mlm[\w.]*) import \(?([\w, \n]+?)\)?\s*(?:#.*)?$", re.M)
    missing = []
    for file in sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "scripts").rglob("*.py"),
                        *(ROOT / "examples").rglob("*.py")]):
        for module, names in statement.findall(file.read_text(encoding="utf-8")):
            imported = importlib.import_module(module)
            for name in (part.split(" as ")[0].strip() for part in names.replace("\n", " ").split(",")):
                if name and not hasattr(imported, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                    missing.append(f"{file.relative_to(ROOT)}: {module}.{name}")
    assert not missing, missing
