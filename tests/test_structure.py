"""The project's shape: layers only point down (common <- pipelines, kernels <- engine), no import cycle
(function-level and type-only imports included), the library free of matplotlib until a plot is drawn,
every module importable on its own, README's method table equal to the registry, one exception family."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "engine", "kernels", "pipelines")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file: module level, function bodies and
    `if TYPE_CHECKING:` blocks alike (a type-only import is still a dependency of the design)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known  # `from engine import losses`
            found.update(subs or {node.module})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    # A module's own parent packages are imported before it anyway: not an edge of the graph.
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere():
    graph = import_graph()
    assert graph["engine.train"] and "engine.heads" in graph["engine.models"]  # the graph is really built
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_only_and_function_level_imports_are_edges(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from engine.config import Config\n"
                      "def f():\n    import pipelines.splits\n")
    known = {"engine.config", "pipelines.splits", "x.mod"}
    assert _imports(source, "x.mod", known) == {"engine.config", "pipelines.splits"}


# Which packages each package may import: common is the bottom, pipelines and kernels sit on it,
# engine (library and commands) sits on all three.
ALLOWED = {
    "common": {"common"},
    "kernels": {"common", "kernels"},
    "pipelines": {"common", "pipelines"},
    "engine": {"common", "engine", "kernels", "pipelines"},
}


def test_layers_only_point_down():
    graph = import_graph()
    assert set(ALLOWED) == set(PACKAGES)
    upward = {m: sorted(d for d in deps if d.split(".")[0] not in ALLOWED[m.split(".")[0]])
              for m, deps in graph.items()}
    assert not any(upward.values()), {m: d for m, d in upward.items() if d}
    assert graph["pipelines.splits"] >= {"common.errors", "common.io"}  # the graph sees the bottom layer


def test_library_does_not_import_the_applications():
    graph = import_graph()
    library = [m for m in graph if m.startswith("engine.") and not m.startswith(("engine.experiments", "engine.cli"))]
    leaks = {m: sorted(d for d in graph[m] if d.startswith("engine.experiments")) for m in library}
    assert not any(leaks.values()), leaks


@pytest.mark.slow  # a child importing every module
def test_every_module_imports_alone_and_training_loads_no_matplotlib():
    code = ("import importlib, sys\n"
            "import engine.train\n"
            "assert 'matplotlib' not in sys.modules, 'import engine.train loaded matplotlib'\n"
            f"for name in {sorted(_modules())!r}:\n"
            "    importlib.import_module(name)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_readme_method_table_is_the_registry():
    from engine.methods import method_table

    assert method_table() in (REPO / "README.md").read_text(), "README's method table differs: paste method_table()"


@pytest.mark.parametrize("name", ["ConfigError", "CheckpointError", "CalibrationError", "TrainingError"])
def test_one_exception_family(name):
    import common.errors as E
    from pipelines.splits import DataError

    assert issubclass(getattr(E, name), E.EngineError) and issubclass(DataError, E.EngineError)
