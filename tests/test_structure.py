"""Structure rules that a refactor could silently break: no import cycles inside longnet, no
side effects at import, comments never cite files outside the repository."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "longnet"


def _module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``: a block that never runs."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that can run: never those of an ``if TYPE_CHECKING:`` body; with
    ``lazy`` also those inside functions (they run when the function is called), without only
    those that run at import (module level, class bodies, ``if`` / ``try`` blocks)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Names a statement may import as modules (``from a import b`` may import ``a.b``), with
    relative imports resolved against ``module``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _import_graph(lazy: bool = False, src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the longnet modules it imports: at import time, or with ``lazy`` also inside
    functions. A package ``__init__`` importing its own submodules is the usual re-export, not a
    cycle, so a module's edge to a package that contains it is dropped."""
    modules = {_module_name(p, src): p for p in src.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _import_nodes(ast.parse(path.read_text()), lazy):
            deps |= {t for t in _targets(node, name, path.name == "__init__.py") if t in modules and t != name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_between_longnet_modules():
    graph = _import_graph()
    assert _cycle(graph) is None, f"import cycle at import time: {' -> '.join(_cycle(graph))}"


def test_no_import_cycles_counting_imports_inside_functions():
    # an import inside a function runs on the first call: a cycle through one is still a cycle
    # (the lower module reaches up into the higher one), only deferred
    graph = _import_graph(lazy=True)
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import A\n",  # a package re-exporting its submodule
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\nA = 1\n",
        "b.py": "def f():\n    from .sub import c\n",  # relative, inside a function
        "sub/__init__.py": "from . import c\n",
        "sub/c.py": "class C:\n    from .. import a\n",  # runs at import (class body)
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    eager, lazy = _import_graph(src=pkg), _import_graph(lazy=True, src=pkg)
    assert eager == {"pkg": {"pkg.a"}, "pkg.a": set(), "pkg.b": set(), "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}}  # TYPE_CHECKING-only imports never run; "pkg" itself is a parent
    assert lazy == {**eager, "pkg.b": {"pkg.sub", "pkg.sub.c"}}
    assert _cycle(lazy) is None
    (pkg / "a.py").write_text("def g():\n    import pkg.b\n")
    assert _cycle(_import_graph(src=pkg)) is None
    assert _cycle(_import_graph(lazy=True, src=pkg)) == ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.a"]


def test_import_has_no_side_effects():
    code = ("import os, sys, torch.distributed as dist; before = set(os.listdir('.')); import longnet, "
            "longnet.parallel, longnet.models, longnet.train; "
            "assert not dist.is_initialized(); assert set(os.listdir('.')) == before; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_sources_never_cite_files_outside_the_repository():
    for path in list(SRC.rglob("*.py")) + list((SRC.parents[1] / "tests").rglob("*.py")):
        text = path.read_text()
        assert "../shared" not in text.replace('"../shared" not in', ""), path
        assert "DESIGN.md" not in text.replace('"DESIGN.md" not in', ""), path


def test_the_accumulator_dtype_rule_lives_only_in_ops_merge():
    # "float64 stays float64, everything else accumulates in float32" is ops.merge.acc_dtype; the
    # operator, its backends, caches and the parallel code call it rather than restating it
    import re

    rule = re.compile(r"torch\.float64\s+if\s+[\w.]+\s*==\s*torch\.float64\s+else\s+torch\.float32")
    places = [p.relative_to(SRC).as_posix() for folder in ("ops", "parallel", "models", "integrations")
              for p in sorted((SRC / folder).rglob("*.py")) if rule.search(p.read_text())]
    assert places == ["ops/merge.py"], places
