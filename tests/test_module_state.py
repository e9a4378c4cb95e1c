"""No module-level mutable state in the package (issue 29): a module-level name bound to a dict,
list or set (a literal, a comprehension or a call such as ``dict()``, ``defaultdict()``,
``WeakKeyDictionary()``) must never be mutated by the package: no ``NAME[...] = ``, no
``del NAME[...]``, no ``NAME.update/append/add/clear/pop/setdefault/...(`` and no ``global NAME``
in its module. Constants that are never mutated are allowed. State lives on objects created by
its owner and passed down (run/load.ModelCache, engines/units.UnitWorker, run/cost.CostCounter),
or is a ``functools.cache`` memo of a constant computation."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "carlos_audit"
MUTATORS = {"update", "append", "extend", "insert", "add", "discard", "remove", "clear", "pop", "popitem",
            "setdefault", "__setitem__", "__delitem__"}
CONTAINER_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque",
                   "WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}


def _is_container(value: ast.expr | None) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        f = value.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        return name in CONTAINER_CALLS
    return False


def _module_containers(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and _is_container(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and _is_container(node.value):
            names.add(node.target.id)
    return names


def _subscripted_name(target: ast.expr) -> str | None:
    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
        return target.value.id
    return None


def _mutations(tree: ast.Module, names: set[str]) -> list[tuple[str, int, str]]:
    """(name, line, how) of every mutation of a module-level container ``names`` in the module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found += [(n, node.lineno, "global") for n in node.names]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            found += [(n, node.lineno, "item assignment") for n in map(_subscripted_name, targets) if n in names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in names and node.func.attr in MUTATORS:
                found.append((owner.id, node.lineno, f".{node.func.attr}("))
    return found


def module_state_offences() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for name, line, how in _mutations(tree, _module_containers(tree)):
            out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({how})")
    return out


def test_no_module_level_container_is_mutated():
    assert module_state_offences() == []


def test_the_walk_finds_each_kind_of_mutation(tmp_path):
    src = ("A = {}\nB: list = []\nC = set()\nD = dict(x=1)\nK = {'fixed': 1}\n"
           "def f():\n    global E\n    A['k'] = 1\n    B.append(2)\n    C.add(3)\n    del D['x']\n    return K['fixed']\n")
    tree = ast.parse(src)
    names = _module_containers(tree)
    assert names == {"A", "B", "C", "D", "K"}
    assert sorted((n, how) for n, _, how in _mutations(tree, names)) == [
        ("A", "item assignment"), ("B", ".append("), ("C", ".add("), ("D", "item assignment"), ("E", "global")]


def test_owned_state_is_per_owner():
    """Two owners keep apart what they hold: loaded models and their cost counts, and a worker's
    loaded run."""
    from carlos_audit.engines.units import UnitWorker
    from carlos_audit.run.load import ModelCache, process_models

    a, b = ModelCache(), ModelCache()
    a.keep(("key",), "lp", "emb")
    a.cost.images_generated += 3
    assert a.get(("key",)) == ("lp", "emb") and a.get(("other",)) is None
    assert b.get(("key",)) is None and b.cost.images_generated == 0
    a.clear()
    assert a.get(("key",)) is None
    assert process_models() is process_models()
    assert UnitWorker(a).models is a and UnitWorker(a).context is None
