"""Rules of the host package's shape, read from its source: only CLI modules print; no import cycles.

Two cycle rules: none among the imports that run when a module is imported (they fail or
half-initialise modules), and none even through imports deferred into functions (a
function-level import back into your importer is the same tangle, only hidden; that is
how ``cli`` ↔ ``cli_fleet`` ↔ ``cli_flash`` once were circular).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "edgekit"
# Only the command line writes to the terminal; everything else returns data, logs, or calls back.
PRINTING_ALLOWED = (PACKAGE / "cli",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, and inside top-level if/try/with blocks.

    Imports inside functions run later, on a call, and cannot take part in an import-time cycle;
    ``if TYPE_CHECKING:`` blocks never run.
    """
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend([*node.body, *node.orelse, *node.finalbody, *(s for h in node.handlers for s in h.body)])
        elif isinstance(node, ast.With):
            stack.extend(node.body)


def all_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in the module, deferred ones in functions included (not ``if TYPE_CHECKING:``)."""
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                 for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_only:
            yield node


def imported_modules(name: str, path: Path, known: set[str], deferred: bool = False) -> set[str]:
    """The edgekit modules ``name`` imports at import time (relative imports resolved, parents included).

    ``deferred``: imports inside functions count too.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in (all_imports if deferred else module_level_imports)(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[:len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        targets.add(base)
        # `from pkg import sub` imports the submodule pkg.sub when there is one
        targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    out = set()
    own_ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in targets:
        parts = target.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ first; the importer's own packages are
        # already being imported when it runs, so they are not edges
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in known and mod != name and mod not in own_ancestors:
                out.add(mod)
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _graph(deferred: bool) -> dict[str, set[str]]:
    mods = sources()
    return {name: imported_modules(name, path, set(mods), deferred) for name, path in mods.items()}


def test_no_import_cycles_in_edgekit():
    graph = _graph(deferred=False)
    assert graph["edgekit.cli.app"] >= {"edgekit.cli.flash", "edgekit.cli.fleet"}  # the graph is read at all
    cycles = import_cycles(graph)
    assert not cycles, "import cycles among edgekit modules: " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_no_dependency_cycles_through_deferred_imports():
    graph = _graph(deferred=True)
    assert "edgekit.flash.fleet_flash" in graph["edgekit.cli.flash"]  # imported inside a command function
    cycles = import_cycles(graph)
    assert not cycles, ("modules that depend on each other through imports inside functions: "
                        + "; ".join(" ↔ ".join(c) for c in cycles))


def test_the_cycle_finder_finds_a_cycle_through_a_relative_import(tmp_path):
    graph = {"edgekit.a": {"edgekit.b"}, "edgekit.b": {"edgekit.c"}, "edgekit.c": {"edgekit.a"}, "edgekit.d": set()}
    assert import_cycles(graph) == [["edgekit.a", "edgekit.b", "edgekit.c"]]
    src = tmp_path / "m.py"
    src.write_text("from . import b\nfrom ..x import y\nif TYPE_CHECKING:\n    from . import c\n"
                   "def f():\n    from . import d\n")
    known = {"edgekit.p.b", "edgekit.p.c", "edgekit.p.d", "edgekit.x", "edgekit.x.y", "edgekit.p"}
    assert imported_modules("edgekit.p.m", src, known) == {"edgekit.p.b", "edgekit.x", "edgekit.x.y"}
    assert imported_modules("edgekit.p.m", src, known, deferred=True) == {"edgekit.p.b", "edgekit.p.d", "edgekit.x",
                                                                          "edgekit.x.y"}


def printing_calls(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``print(...)``, ``<anything>.print(...)`` (rich consoles) and ``sys.stdout/stderr.write(...)``."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "print":
            yield node.lineno, "print()"
        elif isinstance(f, ast.Attribute) and f.attr == "print":
            yield node.lineno, f"{ast.unparse(f)}()"
        elif (isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
              and f.value.attr in ("stdout", "stderr") and isinstance(f.value.value, ast.Name)
              and f.value.value.id == "sys"):
            yield node.lineno, f"{ast.unparse(f)}()"


def test_only_cli_modules_print():
    offenders = []
    for name, path in sources().items():
        if any(path.is_relative_to(allowed) for allowed in PRINTING_ALLOWED):
            continue
        for line, call in printing_calls(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(REPO)}:{line} {call}")
    assert not offenders, ("library modules return data, log, or take a callback; only edgekit/cli prints:\n"
                           + "\n".join(offenders))


def test_the_print_finder_sees_each_form():
    tree = ast.parse("print('x')\nconsole.print('y')\nsys.stdout.write('z')\nlog.info('fine')\n")
    assert [call for _, call in printing_calls(tree)] == ["print()", "console.print()", "sys.stdout.write()"]


# ----------------------------------------------------------------------------- layering
def _raw_imports(path: Path) -> set[str]:
    """Absolute names a file imports, anywhere in it (relative imports kept as '.'-prefixed)."""
    out = set()
    for node in all_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        else:
            out.add("." * node.level + (node.module or ""))
    return out


def test_the_contract_imports_only_the_standard_library():
    import sys

    contract = REPO / "runtime" / "edgekit_runtime" / "contract"
    files = sorted(contract.glob("*.py"))
    assert len(files) >= 4  # __init__, bundle_spec, errors, fleet_protocol, manifest
    for path in files:
        for name in _raw_imports(path):
            if name.startswith("."):  # the contract's own modules, nothing above them
                assert not name.startswith(".."), f"{path.name} imports {name} from outside the contract"
                continue
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", f"{path.name} imports {name}"


CONCRETE_BACKENDS = ("quantize_openvino", "quantize_onnxruntime", "quantize_tensorrt", "quantize_tflite",
                     "tensorrt_calibration", "openvino_engine", "onnxruntime_engine", "tensorrt_engine",
                     "tflite_engine")


def test_stages_and_gates_never_import_a_concrete_backend():
    build = PACKAGE / "build"
    files = [*sorted((build / "stages").glob("*.py")), build / "pipeline.py", build / "gates.py",
             build / "measure.py", build / "state.py"]
    for path in files:
        for name in _raw_imports(path):
            leaf = name.rsplit(".", 1)[-1]
            assert leaf not in CONCRETE_BACKENDS, f"{path.relative_to(REPO)} imports {name}: go through the registry"
        # nor the backend libraries themselves
        for lib in ("openvino", "onnxruntime", "nncf", "tensorrt", "ai_edge_litert", "litert_torch"):
            assert lib not in {n.split(".")[0] for n in _raw_imports(path)}, f"{path.name} imports {lib}"


def test_the_layering_checks_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..backends.quantize_openvino import X\n    import numpy\n")
    names = _raw_imports(bad)
    assert "..backends.quantize_openvino" in names and "numpy" in names
