"""The package's shape: imports run one way, and the attention hook depends on nothing above it.

Every import counts: at module level, inside a function (a lazy import closes a circle as surely as
a top-level one) and under ``if TYPE_CHECKING:`` (an annotation's import never runs, but it says
the two modules know each other all the same). ``from package import name`` counts as an import of
the submodule when ``name`` is one.
"""

import ast
import os
from pathlib import Path

import pytest

import halluguard

PACKAGE = Path(halluguard.__file__).parent


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module under ``root`` (links to the kernels and eval folders
    followed, as the installed package holds them)."""
    found = {}
    files = (Path(folder, f) for folder, _, names in os.walk(root, followlinks=True) for f in names)
    for path in sorted(f for f in files if f.suffix == ".py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST):
    """Every import statement of ``tree``, wherever it sits."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict) -> set[str]:
    """The modules of ``known`` that ``node`` (in module ``name``) imports."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = name.split(".") if is_package else name.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        candidates = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
    found = set()
    for target in candidates:
        while target and target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in known and target != name:
            found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_targets(name, is_package, n, known) for n in _imports(tree)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_lazy_and_annotation_imports_and_finds_a_planted_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("x = 1\n")
    (package / "inner" / "__init__.py").write_text("from ..a import x\n")
    (package / "c.py").write_text("def f():\n    from .inner import y\n")
    graph = import_graph(package)
    assert graph["pkg.c"] == {"pkg.inner"} and graph["pkg.inner"] == {"pkg.a"} and graph["pkg.a"] == set()
    assert cycles(graph) == []
    for back in (
        "def g():\n    from . import c\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",
    ):
        (package / "a.py").write_text(back)
        assert cycles(import_graph(package)) == [["pkg.a", "pkg.c", "pkg.inner"]]


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 60 and "halluguard.kernels.decode_attention" in graph and "halluguard.eval.runner" in graph
    assert cycles(graph) == []


@pytest.mark.parametrize(
    "layer,allowed",
    [
        ("halluguard.attention", ("halluguard.attention", "halluguard.kernels")),
        ("halluguard.kernels", ("halluguard.kernels",)),
        ("halluguard.compat", ()),
        ("halluguard.config", ()),
    ],
)
def test_the_lower_layers_import_nothing_above_them(layer, allowed):
    graph = import_graph(PACKAGE)
    for name, targets in graph.items():
        if name == layer or name.startswith(layer + "."):
            above = sorted(t for t in targets if not any(t == a or t.startswith(a + ".") for a in allowed))
            assert not above, f"{name} imports {above}"


def test_the_library_never_imports_its_command_line():
    graph = import_graph(PACKAGE)
    users = sorted(name for name, targets in graph.items() if "halluguard.cli" in targets)
    assert users == ["halluguard.__main__"]


LONGEST = 60  # lines of a function, its signature and docstring included


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return any("triton.jit" in ast.unparse(d) for d in node.decorator_list)


def long_functions(root: Path, longest: int = LONGEST) -> list[str]:
    """``path:line name (lines)`` of every function over ``longest`` lines, Triton kernels aside."""
    found = []
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > longest:
                    found.append(f"{name}:{node.lineno} {node.name} ({lines})")
    return found


def test_no_function_is_longer_than_sixty_lines_outside_the_triton_kernels(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("def long():\n" + "    x = 1\n" * LONGEST)
    assert long_functions(package) == [f"pkg:1 long ({LONGEST + 1})"]  # the measure finds one
    assert long_functions(PACKAGE) == []
