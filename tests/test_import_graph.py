"""The package's imports read from its source: no module imports itself back through others (a circle), and every
third-party module the code imports is declared in environment.REQUIREMENTS, the one requirement table."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from instantid_colab.environment import OPTIONAL, REQUIREMENTS

PACKAGE = Path(__file__).resolve().parents[1] / "instantid_colab"
ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
# Imported on a user path but provided by the place the code runs in, never installed by anyone.
PROVIDED_BY_THE_HOST = {
    "google": "google.colab exists only inside Colab (notebook.py asks for it there)",
    "IPython": "every notebook kernel runs in IPython (notebook.py displays through it)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function; not what only type checkers read
    (`if TYPE_CHECKING:`). `from package import submodule` counts as the submodule."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for statement in node.orelse:
                    self.visit(statement)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            assert node.level == 0, f"{path}: relative import"
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(node.module)

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return found


def imported_when_imported(path: Path) -> set[str]:
    """What `path` imports at module level (inside module-level try/if too, not under TYPE_CHECKING)."""
    found: set[str] = set()

    def walk(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
                found.update(submodules)
                if len(submodules) < len(node.names):
                    found.add(node.module)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for handler in node.handlers:
                    walk(handler.body)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                walk(node.body)
                walk(node.orelse)

    walk(ast.parse(path.read_text(), str(path)).body)
    return found


def package_graph() -> dict[str, set[str]]:
    return {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":  # on the path being walked: the path from it back to it is a circle
                found.append(trail[trail.index(target):] + [node, target])
            elif target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_package_imports_without_circles():
    assert circles(package_graph()) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c", "a"]]


def test_the_import_reader_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n"
                      "def f():\n    from instantid_colab import settings\n    import torch\n")
    assert imports(source) == {"os", "typing", "instantid_colab.settings", "torch"}


def test_every_third_party_import_is_a_declared_requirement():
    declared = {row.module for row in (*REQUIREMENTS, *OPTIONAL)}
    undeclared = {}
    for name, path in MODULES.items():
        for module in imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "instantid_colab" or top in PROVIDED_BY_THE_HOST:
                continue
            if top not in declared:
                undeclared.setdefault(top, []).append(name)
    assert undeclared == {}, "imported but not in environment.REQUIREMENTS (or PROVIDED_BY_THE_HOST)"


def test_the_requirement_check_sees_third_party_imports():
    """The check above can fail: the modules the package imports include packages, not just the stdlib."""
    tops = {module.split(".")[0] for path in MODULES.values() for module in imports(path)}
    assert {"matplotlib", "diffusers", "psutil", "accelerate", "google"} <= tops


# docs/ARCHITECTURE.md's floors, as import names: what each floor adds to the ones below it.
FLOOR_PACKAGES = {"ground": {"packaging"}, "measure": {"psutil"},
                  "models": {"numpy", "PIL", "cv2", "torch", "diffusers", "transformers", "onnx"}, "app": {"gradio"}}


def documented_floors() -> dict[str, str]:
    """module -> floor, from the Floors table of docs/ARCHITECTURE.md."""
    table = ARCHITECTURE.read_text().split("## Floors", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in FLOOR_PACKAGES:
            floors.update({f"instantid_colab.{name.strip('` ')}": cells[0] for name in cells[2].split(",")})
    return floors


def test_every_module_imports_no_more_than_its_floor_allows():
    floors = documented_floors()
    assert set(floors) == set(MODULES) - {"instantid_colab"}, "every module is in the Floors table once"
    order = list(FLOOR_PACKAGES)
    for name, floor in floors.items():
        allowed = set().union(*(FLOOR_PACKAGES[f] for f in order[:order.index(floor) + 1]))
        for module in imported_when_imported(MODULES[name]):
            top = module.split(".")[0]
            if module in MODULES and module != "instantid_colab":
                assert order.index(floors[module]) <= order.index(floor), f"{name} ({floor}) imports {module}"
            elif top not in sys.stdlib_module_names and top != "instantid_colab":
                assert top in allowed, f"{name} is on the {floor} floor but imports {module} when imported"
