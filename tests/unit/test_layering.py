"""The package's layers: no subpackage imports one above it, and no two modules import each
other in a loop.

Every ``import`` in every module counts, including imports inside functions and under
``TYPE_CHECKING``: a dependency is a dependency wherever it is written.
"""

import ast
from pathlib import Path

import mmlens

PACKAGE = Path(mmlens.__file__).parent

# What each subpackage may import besides itself (lowest first).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "inputs": {"data", "core"},
    "model": {"inputs", "data", "core"},
    "zoo": {"model", "inputs", "data", "core"},
    "methods": {"model", "inputs", "data", "core"},
    "plotting": {"methods", "model", "inputs", "data", "core"},
    "experiments": {"plotting", "methods", "model", "inputs", "zoo", "data", "core"},
}
ENTRY_POINTS = {"__init__", "cli", "__main__"}


def imported_subpackages(path: Path) -> set[tuple[str, int]]:
    """``(subpackage, line)`` for every mmlens subpackage the module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "mmlens":
                names = [f"mmlens.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mmlens" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_every_subpackage_has_a_rule():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(ALLOWED)
    top_level = {p.stem for p in PACKAGE.glob("*.py")}
    assert top_level <= ENTRY_POINTS, f"only entry points belong at the top: {top_level}"


def test_no_subpackage_imports_a_higher_one():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1:
            continue  # entry points may import anything
        own = relative.parts[0]
        for target, line in sorted(imported_subpackages(path)):
            if target != own and target not in ALLOWED[own]:
                violations.append(f"mmlens/{relative}:{line} imports mmlens.{target}")
    assert not violations, "\n".join(violations)


def test_the_rules_have_no_cycle():
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"cycle: {' -> '.join((*stack, name))}"
        if name not in done:
            for below in ALLOWED[name]:
                visit(below, (*stack, name))
            done.add(name)

    for name in ALLOWED:
        visit(name, ())


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mmlens.experiments import x\nimport mmlens.model.y\n"
                      "from mmlens import methods\n")
    assert imported_subpackages(module) == {("experiments", 2), ("model", 3), ("methods", 4)}


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The mmlens modules one file imports (a name taken from a package counts as its submodule
    where one of that name exists), inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def test_no_two_modules_import_each_other_in_a_loop():
    paths = {_module_of(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: module_imports(path, set(paths)) - {name} for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        assert name not in stack, f"import loop: {' -> '.join([*stack[stack.index(name):], name])}"
        if name not in done:
            stack.append(name)
            for target in sorted(graph[name]):
                visit(target, stack)
            stack.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
