"""Imports run one way: producer -> core, workers -> core; core imports neither, the
producer never imports the workers, and no module imports itself round a loop.
Read from the source with ast (imports inside functions count too), so a
violation fails here before it tangles the packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("core", "workers", "producer")
# Checked for import loops too (bench/ scripts import each other as ``bench.x``).
LOOP_PACKAGES = (*PACKAGES, "bench")
# Where a function-local import may not close a loop either: a local import that
# dodges a circle (``def create_app(): from producer.ui import ...``) still couples the
# two modules both ways, so these packages are checked with every import.
ALL_IMPORTS = ("producer",)
# package -> the project packages it may import
ALLOWED = {"core": {"core"}, "workers": {"core", "workers"}, "producer": {"core", "producer"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool, packages=PACKAGES) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in packages}


def _sources(packages=PACKAGES) -> dict[str, Path]:
    return {_module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_imports_point_one_way():
    bad = []
    for name, path in _sources().items():
        pkg = name.split(".")[0]
        for imported in _imports(path, top_level_only=False):
            if imported.split(".")[0] not in ALLOWED[pkg]:
                bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_loops():
    """Among module-level imports (what runs when a module is first imported), and in
    ALL_IMPORTS' packages among every import, function-local ones included. Importing
    ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those count as
    imported too (except the importer's own packages, already importing)."""
    sources = _sources(LOOP_PACKAGES)
    graph = {}
    for name, path in sources.items():
        deps = set()
        everything = name.split(".")[0] in ALL_IMPORTS
        for imported in _imports(path, top_level_only=not everything,
                                 packages=LOOP_PACKAGES):
            # "from core.store import Job" names a module or a name in one
            mod = imported if imported in sources else imported.rsplit(".", 1)[0]
            if mod in sources and mod != name:
                deps.add(mod)
            own = {name, *_ancestors(name)}
            deps |= {p for p in _ancestors(mod) if p in sources and p not in own}
        graph[name] = deps
    loops = []

    def visit(node: str, stack: list[str], state: dict[str, int]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                loops.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep], state)
        state[node] = 2

    state: dict[str, int] = {}
    for node in sorted(graph):
        if node not in state:
            visit(node, [node], state)
    # A package's __init__ importing its own submodules is the one allowed loop shape.
    loops = [lp for lp in loops if not _package_reexport(lp)]
    assert not loops, "\n".join(loops)


def _package_reexport(loop: str) -> bool:
    mods = loop.split(" -> ")
    return len(set(mods)) == 2 and any(m.startswith(o + ".") for m in mods for o in mods)


def test_the_api_and_sdk_do_not_import_torch():
    """The API process validates with Pillow and soundfile alone: torch would add
    ~500 MB to every API process (measured: mmq api 589 -> 114 MiB RSS)."""
    code = ("import sys, producer.api, producer.sdk, producer.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchaudio', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", out


# -- bench/ and tests/ too: no loops anywhere, bench/ never imports tests/ -----------------------

def _project_imports(path: Path, roots: set[str], *, top_level_only: bool) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` gives a.b and a.b.c);
    all but top-level ones: those in functions too, not those under ``if TYPE_CHECKING:``
    (annotations only, never run)."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(nodes):
        for node in nodes:
            yield node
            if top_level_only:
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
                continue
            yield from walk(ast.iter_child_nodes(node))

    out: set[str] = set()
    for node in walk(tree.body):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in roots}


def test_no_import_loops_in_bench_or_tests_and_bench_never_imports_tests():
    """bench/ scripts and the tests import the packages, and tests may import bench/
    (its fault injectors, bench/faults.py); bench/ never imports tests/, and no module
    anywhere imports itself round a loop (bench/chaos.py and chaos_scenarios.py once
    did, through an import inside main()). Loops count every import that runs in bench/
    and tests/, and the module-level ones in the packages (as test_no_import_loops).
    Tests import plain helpers from tests/helpers.py, never a test module or a conftest
    (pytest imports those itself)."""
    roots = {*PACKAGES, "bench", "tests"}
    sources = {_module_name(p): p for r in roots for p in (ROOT / r).rglob("*.py")}
    bad, graph = [], {}
    for name, path in sources.items():
        for imported in _project_imports(path, roots, top_level_only=False):
            top, last = imported.split(".")[0], imported.split(".")[-1]
            if name.startswith("bench.") and top == "tests":
                bad.append(f"{name} imports {imported} (bench/ never imports tests/)")
            if top == "tests" and (last.startswith("test_") or last == "conftest"):
                bad.append(f"{name} imports {imported} (a test module or a conftest)")
        deps = set()
        in_packages = name.split(".")[0] in PACKAGES
        for imported in _project_imports(path, roots, top_level_only=in_packages):
            mod = imported if imported in sources else imported.rsplit(".", 1)[0]
            if mod in sources and mod != name:
                deps.add(mod)
        graph[name] = deps
    assert not bad, "\n".join(sorted(bad))

    loops, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                loops.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    loops = [lp for lp in loops if not _package_reexport(lp)]
    assert not loops, "\n".join(loops)
