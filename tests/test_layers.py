"""The package's layers, read from the source: lower layers never import the client.

Data flows client -> routing -> wire/protocol -> server and back (docs/architecture.md#code-layout); the server, routing,
the DHT code, the dashboard and the block math must work without loading client code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import petals_like

PACKAGE = Path(petals_like.__file__).parent
BELOW_CLIENT = (
    "server",
    "routing",
    "dht",
    "dashboard",
    "models",
    "quant",
    "protocol.py",
    "wire.py",
    "config.py",
    "data_structures.py",
)


def imports(path: Path, package: str = "petals_like", modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module of `package` a file imports, at the top or inside functions; `from p import m` counts as
    p.m where p.m is one of `modules` (the package's module names), else as p."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == package or name.startswith(f"{package}.")}


def test_nothing_below_the_client_imports_it():
    files = [f for part in BELOW_CLIENT for f in ([PACKAGE / part] if part.endswith(".py") else (PACKAGE / part).rglob("*.py"))]
    assert len(files) > 30  # the walk found the package
    upward = {str(f.relative_to(PACKAGE)): sorted(m for m in imports(f) if m.startswith("petals_like.client")) for f in files}
    assert {f: m for f, m in upward.items() if m} == {}


def test_the_import_reader_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom petals_like.protocol import call_info\n\ndef f():\n    from petals_like.client import model\n"
    )
    assert imports(probe) == {"petals_like.protocol", "petals_like.client"}


def test_the_library_does_not_import_the_harness():
    """scripts/ (the soak, chaos and fine-tuning harness) is not installed: nothing in the package may
    import it. petals_like.testing (local swarms, oracles, the network test bed) is for the demo and the
    bench (cli/, bench/), the tests and scripts/: the library itself never imports it."""
    files = list(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    harness = {str(f.relative_to(PACKAGE)): sorted(imports(f, "scripts") | imports(f, "harness")) for f in files}
    assert {f: m for f, m in harness.items() if m} == {}
    library = [f for f in files if f.relative_to(PACKAGE).parts[0] not in ("testing", "cli", "bench")]
    testing = {str(f.relative_to(PACKAGE)): sorted(m for m in imports(f) if m.startswith("petals_like.testing")) for f in library}
    assert {f: m for f, m in testing.items() if m} == {}


def _module_name(path: Path) -> str:
    parts = ("petals_like",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    modules = frozenset(files)
    return {name: {m for m in imports(path, modules=modules) if m in files and m != name} for name, path in files.items()}


def test_the_block_math_does_not_know_quantization():
    """models/ multiplies by whatever weight linear() accepts; quant/ swaps its weights in from outside."""
    graph = import_graph()
    upward = {m: sorted(d for d in deps if d.startswith("petals_like.quant")) for m, deps in graph.items()}
    assert {m: d for m, d in upward.items() if m.startswith("petals_like.models") and d} == {}


def test_no_import_cycles():
    """Not even through imports inside functions: each one is a hidden dependency both ways."""
    graph = import_graph()
    assert len(graph) > 50
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []
