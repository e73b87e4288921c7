"""The shape of the repo: imports go one way, one concern per harness module, every dependency declared, and the
agent's reading list short. Read from the sources themselves (ast), never by running them."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = sorted([*ROOT.glob("*.py"), *(ROOT / "harness").glob("*.py"), *(ROOT / "tools").glob("*.py")])
READING_LIST = ["README.md", "prepare.py", "train.py", "program.md"]   # what program.md's setup has the agent read


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """Every module a file imports, at any depth (inside functions too): ('pkg.mod', ...) as written."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]   # `from harness import loader`
    return found


def test_imports_between_the_project_modules_form_no_cycle():
    names = {module_name(p): p for p in PRODUCT}
    graph = {name: {m for m in imports(path) if m in names and m != name} for name, path in names.items()}
    assert "build" not in names   # the old one-file harness is gone
    assert "prepare" not in {m for name, deps in graph.items() if name.startswith("harness") for m in deps}
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_harness_module_is_over_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in [ROOT / "prepare.py", *(ROOT / "harness").glob("*.py")]}
    assert max(sizes.values()) <= 500, sizes


def test_every_third_party_import_is_declared_and_no_private_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = project["project"]["dependencies"] + [d for group in project["dependency-groups"].values() for d in group]
    declared = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared}
    distributions = importlib.metadata.packages_distributions()   # top-level module -> the distributions that have it
    local = {p.stem for p in PRODUCT} | {"harness", "tools"}
    for path in PRODUCT:
        for name in imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in local or top == "__future__":
                continue
            owners = {d.lower().replace("_", "-") for d in distributions.get(top, [])}
            assert owners & declared, f"{path.name} imports {name}: not declared in pyproject.toml ({owners})"
            assert not re.search(r"(^|\.)_[a-z]", name) or top == "torch", f"{path.name} imports private {name}"


def test_nothing_of_the_product_imports_the_tests():
    test_modules = {"tests", "conftest"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    for path in PRODUCT:
        assert not [name for name in imports(path) if name.split(".")[0] in test_modules], path.name
        assert '/ "tests"' not in path.read_text(), f"{path.name} puts tests/ on its import path"


def test_the_agents_reading_list_is_at_most_1300_lines():
    lines = {name: len((ROOT / name).read_text().splitlines()) for name in READING_LIST}
    assert sum(lines.values()) <= 1300, lines
