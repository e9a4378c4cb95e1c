"""The size rules of the house (docs/ARCHITECTURE.md): no module over 500 lines, no function over
60 lines, none with more than 7 parameters (self/cls not counted; ``*args`` and ``**kwargs`` count
one each). Read with ``ast`` from every module of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "carlos_audit"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 7

#: Known exceptions, each removed by the branch that owns its file (issue 29). Remove an entry
#: when the function is brought under the rule; the test fails on an entry that no longer breaks it.
KNOWN: dict[str, str] = {}  # none left: a breach is fixed, not listed


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def parameter_count(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    if names[:1] in (["self"], ["cls"]):
        names = names[1:]
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def function_lines(fn: ast.FunctionDef) -> int:
    """From the ``def`` line (decorators not counted) to the last line of the body."""
    return fn.end_lineno - fn.lineno + 1


def breaches() -> dict[str, set[str]]:
    """``module:function`` -> the rules it breaks ("lines", "parameters"); ``module`` -> {"module lines"}."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text("utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            out.setdefault(rel, set()).add("module lines")
        for fn in _functions(ast.parse(text)):
            name = f"{rel}:{fn.name}"
            if function_lines(fn) > MAX_FUNCTION_LINES:
                out.setdefault(name, set()).add("lines")
            if parameter_count(fn) > MAX_PARAMETERS:
                out.setdefault(name, set()).add("parameters")
    return out


def test_the_counts_read_the_source_as_written():
    fn = ast.parse("class A:\n    def f(self, a, /, b, *c, d, **e):\n        return 1\n").body[0].body[0]
    assert parameter_count(fn) == 5 and function_lines(fn) == 2
    plain = ast.parse("def g(a, b=1, *, c):\n    pass\n").body[0]
    assert parameter_count(plain) == 3


def test_no_module_function_or_signature_over_the_limits():
    found = breaches()
    new = sorted(f"{name}: {', '.join(sorted(rules))}" for name, rules in found.items()
                 if not rules <= ({KNOWN[name]} if name in KNOWN else set()))
    assert not new, (f"over the house limits ({MAX_MODULE_LINES} lines a module, {MAX_FUNCTION_LINES} a function, "
                     f"{MAX_PARAMETERS} parameters):\n" + "\n".join(new))


def test_known_exceptions_still_break_the_rule():
    """An exception fixed elsewhere must leave the list (the list only shrinks)."""
    found = breaches()
    stale = sorted(name for name, rule in KNOWN.items() if rule not in found.get(name, set()))
    assert not stale, "no longer over the limit, remove from KNOWN: " + ", ".join(stale)
