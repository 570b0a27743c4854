"""The project's shape: no import cycle (function-level imports included), the library free of
matplotlib until a plot is drawn, every module importable on its own, README's method table
equal to the registry, one exception family."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "pipelines")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (function bodies too), except under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
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


def test_library_does_not_import_the_applications():
    graph = import_graph()
    library = [m for m in graph if m.startswith("engine.") and not m.startswith(("engine.experiments", "engine.cli"))]
    leaks = {m: sorted(d for d in graph[m] if d.startswith("engine.experiments")) for m in library}
    assert not any(leaks.values()), leaks


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
    import engine.errors as E
    from pipelines.splits import DataError

    assert issubclass(getattr(E, name), E.EngineError) and issubclass(DataError, E.EngineError)
