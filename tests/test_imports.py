"""The package's imports form no circle (docs/architecture.md: the modules and their floors), and every module
imports on its own, first, in a fresh interpreter state."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hvd_imagenet"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere: at the top, in a function (a local import is still a
    dependency), under TYPE_CHECKING; and each importer's parent packages, whose __init__ runs first."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update([target, *(f"{target}.{alias.name}" for alias in node.names)])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    for target in list(found):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a path that starts and ends at the same module), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


@pytest.mark.unit
def test_the_walker_finds_a_circle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": set()}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


@pytest.mark.unit
def test_the_walker_reads_local_type_checking_and_parent_imports(tmp_path):
    modules = {"hvd_imagenet", "hvd_imagenet.config", "hvd_imagenet.data", "hvd_imagenet.data.loaders"}
    source = PACKAGE / "data" / "loaders.py"  # imports `from . import LOADERS`, and config under TYPE_CHECKING
    assert {"hvd_imagenet.data", "hvd_imagenet.config"} <= imports_of(source, modules)


@pytest.mark.unit
def test_the_package_imports_form_no_circle():
    graph = import_graph()
    assert {"hvd_imagenet.comm", "hvd_imagenet.config"} <= graph["hvd_imagenet.train"]  # the walk reads them all
    assert "hvd_imagenet.study.grid" in graph["hvd_imagenet.study.report"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.cli
def test_every_module_imports_first_on_its_own():
    """Each module imported with none of the package loaded before it (third-party modules stay cached, so
    this takes seconds, not a fresh interpreter per module): one that works only after another is a hidden
    order dependency."""
    names = sorted(import_graph())
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'hvd_imagenet' or m.startswith('hvd_imagenet.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        print(f'{name}: {type(error).__name__}: {error}')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", done.stdout
