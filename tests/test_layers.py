"""The layer rule (docs/ARCHITECTURE.md, "Layers"): no import circle between modules of
carlos_audit, and no module imports from a layer above its own. Imports are read with ``ast``
from every module, at any depth (a function-level import counts as much as a top-level one)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "carlos_audit"

#: top down; a module belongs to the first entry that is it or a package above it
LAYERS = [
    ["carlos_audit.cli"],
    ["carlos_audit.demo", "carlos_audit.demo_claimed", "carlos_audit.engines"],
    ["carlos_audit.pipeline", "carlos_audit.looks", "carlos_audit.verify", "carlos_audit.kit", "carlos_audit.check"],
    ["carlos_audit.report"],
    ["carlos_audit.analysis"],
    ["carlos_audit.corpus"],
    ["carlos_audit.run"],
    ["carlos_audit.casefolder"],
    ["carlos_audit.case"],
    ["carlos_audit.models"],
    ["carlos_audit.lora"],
    ["carlos_audit.records", "carlos_audit.record_sections", "carlos_audit.result_sections", "carlos_audit.paths",
     "carlos_audit.vectors", "carlos_audit.errors", "carlos_audit.fileio", "carlos_audit.hashing", "carlos_audit"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The carlos_audit modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    best = None
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if (name == e or name.startswith(e + ".")) and (best is None or len(e) > len(best[1])):
                best = (i, e)
    assert best is not None, f"{name} is in no layer"
    return best[0]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def test_no_module_imports_from_a_layer_above():
    g = graph()
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                    for m, deps in g.items() for d in deps
                    if layer_of(d) < layer_of(m) and not m.startswith(d + "."))  # a package's own __init__
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_no_import_circle():
    g = graph()
    for d in g.values():  # a module importing its package's __init__ is not a circle through it
        d.discard("carlos_audit")
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g[m]):
            if m.startswith(d + "."):
                continue  # a package's __init__ imported by its own module
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_rule_sees_what_it_checks(tmp_path):
    """The checker finds an upward import and a circle when there is one (so a pass means something)."""
    assert layer_of("carlos_audit.run.profile") > layer_of("carlos_audit.analysis.case_analysis")
    assert layer_of("carlos_audit.engines.corpus_build") < layer_of("carlos_audit.corpus.store")
    g = graph()
    assert "carlos_audit.casefolder.unit_store" in g["carlos_audit.pipeline"]
    assert "carlos_audit.analysis.metrics" in g["carlos_audit.analysis.indicators"]
