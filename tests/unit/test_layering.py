"""Dependencies point one way: no import cycle between moe_pd's parts, and the router process imports no torch.

A part is a subpackage of moe_pd (config, model, parallel, overlap, eplb, kvcache, engine, serve, profiling,
kernels, ...) or a top-level module (moe_pd/fp8.py, moe_pd/generate.py, ...). Every import counts, also one
inside a function or under TYPE_CHECKING: a lazy import is still a dependency, and a cycle through one is
what makes a module impossible to move or test alone.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"moe_pd": ROOT / "moe_pd", "moe_pd.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (kernels/ is moe_pd.kernels)."""
    out = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The moe_pd modules `name` imports; `from package import submodule` counts as the submodule."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m in known and m != name}


def part(module: str) -> str:
    """moe_pd.serve.router -> serve; moe_pd.kernels.gate -> kernels; moe_pd.generate -> generate."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "moe_pd"


def graph(level) -> dict[str, dict[str, set[tuple[str, str]]]]:
    """node -> node it depends on -> the module imports behind that edge."""
    known = modules()
    edges: dict[str, dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    for name, path in known.items():
        for target in imports(name, path, known):
            a, b = level(name), level(target)
            if a != b:
                edges[a][b].add((name, target))
    return edges


def find_cycle(edges: dict[str, dict[str, set]]) -> list[str] | None:
    """One cycle as a node list (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def explain(edges, cycle: list[str]) -> str:
    return "\n".join(f"  {a} -> {b}: " + ", ".join(f"{x} imports {y}" for x, y in sorted(edges[a][b]))
                     for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycle_between_parts():
    edges = graph(part)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between moe_pd's parts:\n" + explain(edges, cycle)


def test_no_import_cycle_between_modules():
    edges = graph(lambda module: module)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between modules:\n" + explain(edges, cycle)


def test_the_checker_sees_a_cycle_through_a_lazy_import(tmp_path, monkeypatch):
    pkg = tmp_path / "moe_pd"
    for rel, text in {"__init__.py": "", "a/__init__.py": "", "b/__init__.py": "",
                      "a/x.py": "from moe_pd.b.y import f\n",
                      "b/y.py": "def f():\n    from moe_pd.a import x\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setitem(SOURCES, "moe_pd", pkg)
    monkeypatch.setitem(SOURCES, "moe_pd.kernels", tmp_path / "none")
    assert find_cycle(graph(part)) in (["a", "b", "a"], ["b", "a", "b"])


def test_the_router_process_imports_no_torch():
    code = "import sys, moe_pd.serve.router; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_source_file_over_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}, f"split these (aim for ~300 lines a file): {long}"
