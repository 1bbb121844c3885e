"""The house reads like the pipeline: each floor imports only its own floor or the floors below,
and nothing imports in a circle (DESIGN.md, "Layout").

Run it on its own to see the graph: ``python -m tests.unit.test_import_graph``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Top-level package -> floor (higher imports lower, never the other way).
FLOORS = {
    # the served model, logged with every ONNX model: it imports nothing of the project
    "phi3_chat": -1,
    "phi3ops": 0,  # core: settings, errors, names, sources, tracking, registry, serving
    "tasks": 1,  # work: plain functions and thin @task wrappers
    "flows": 2,  # orchestration
    "deployments": 2,
    "offline": 2,  # shipped test fixtures, beside orchestration, above tasks
    "cli": 3,  # entry points
    "bench": 3,
}
#: Who may import the shipped test fixtures (tests may too; they are not walked here).
OFFLINE_IMPORTERS = {"cli", "bench", "offline"}
#: Where imports of project modules may sit inside functions (fast ``--help``).
LAZY_IMPORT_PACKAGES = {"cli", "bench"}
MAX_LINES = 600
#: What the served model may import besides the standard library and itself: what its logged
#: pip requirements install, so that a logged model loads anywhere.
SERVED_MODEL_IMPORTS = {"mlflow", "numpy", "pandas", "onnxruntime_genai"}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the floors."""
    modules = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    function_lines = {
        node.lineno
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(func)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports the module; `from module import name` the module.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            if target.split(".")[0] in FLOORS and target in modules:
                yield target, node.lineno, node.lineno in function_lines


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {target for target, _, _ in imports_of(name, path, modules) if target != name}
        for name, path in modules.items()
    }


def test_no_module_imports_a_floor_above_its_own() -> None:
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        floor = FLOORS[name.split(".")[0]]
        for target, line, _ in imports_of(name, path, modules):
            top = target.split(".")[0]
            if FLOORS[top] > floor:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (floor above)")
            elif top == "offline" and name.split(".")[0] not in OFFLINE_IMPORTERS:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the test fixtures {target}")
    assert wrong == []


def test_project_imports_sit_inside_functions_only_in_entry_points() -> None:
    modules = project_modules()
    hidden = [
        f"{path.relative_to(ROOT)}:{line} imports {target} inside a function"
        for name, path in modules.items()
        if name.split(".")[0] not in LAZY_IMPORT_PACKAGES
        for target, line, lazy in imports_of(name, path, modules)
        if lazy
    ]
    assert hidden == []


def test_no_import_cycle() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert [" -> ".join(cycle) for cycle in cycles] == []


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_modules_stay_short(name: str) -> None:
    path = project_modules()[name]
    relative = path.relative_to(ROOT).as_posix()
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{relative} has {lines} lines: split it into a package"


def test_the_served_model_imports_only_what_its_requirements_install() -> None:
    # Neither Prefect nor any floor of the project: the package is logged with the model and
    # imported wherever it is loaded, with the model's pip requirements only.
    wrong = []
    for path in sorted((ROOT / "phi3_chat").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = top in SERVED_MODEL_IMPORTS or top in sys.stdlib_module_names
                if not (allowed or top == "phi3_chat"):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert wrong == []


if __name__ == "__main__":
    for module, targets in sorted(graph().items()):
        print(f"{module}: {', '.join(sorted(targets)) or '-'}")
