"""Structure rules that a refactor could silently break: no import cycles inside longnet, no
side effects at import, comments never cite files outside the repository."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "longnet"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> longnet modules it imports at module level (imports inside functions are lazy)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
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
    # a package __init__ importing its own submodules is the usual re-export, not a cycle
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") and d in graph)}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


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
