"""The typed case sections (case/spec.py, generated from casefile.SCHEMA) and the rule that code
outside case/ reads them by attribute, never by string key."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from carlos_audit.case.casefile import SCHEMA, SECTION_TYPES, Case, parse_case
from carlos_audit.case.sequential_plan import KEYS as SEQUENTIAL_KEYS, SequentialSpec

PACKAGE = Path(__file__).resolve().parents[1] / "carlos_audit"
SECTIONS = set(SCHEMA)
#: names that hold a Case in the package; calls that return one
CASE_NAMES = {"case", "template", "tmpl"}
CASE_CALLS = {"load_case", "parse_case", "recorded_case", "derive_case", "case_for_lora"}
#: case/ itself builds the sections from the validated tables
SKIPPED = ("case",)

CASE_TEXT = """
[case]
id = "c1"
title = "t"
examiner = "e"
question = "q"
[base_model]
source = "embedded:tiny-sd"
[embedder]
model = "embedded:tiny-clip"
[lora]
path = "x.safetensors"
trigger_words = ["tw"]
[protocol]
prompts = "builtin:demo"
seeds = { count = 4, start = 2 }
guidance_scale = 7
batch_size = 2
[protocol.sequential]
order_seed = 1
step = 2
min_prompts = 2
strength_half_width = 0.1
"""


def test_every_schema_key_is_a_typed_frozen_field(tmp_path):
    case = parse_case(CASE_TEXT, tmp_path / "c.toml")
    for section, keys in SCHEMA.items():
        spec = getattr(case, section)
        assert isinstance(spec, SECTION_TYPES[section])
        assert [f.name for f in dataclasses.fields(spec)] == list(keys)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, next(iter(keys)), None)
    assert case.protocol.steps == 25 and case.protocol.guidance_scale == 7.0
    assert isinstance(case.protocol.guidance_scale, float)
    assert case.protocol.seeds == [2, 3, 4, 5] and case.lora.trigger_words == ["tw"]
    assert case.id == "c1" and case.case.exhibit == "Exhibit 1" and case.claimed_works.nearest == 3
    types = {f.name: f.type for f in dataclasses.fields(SECTION_TYPES["protocol"])}
    assert types["steps"] is int and types["scales"] == list[float]
    with pytest.raises(AttributeError):
        case.protocol.no_such_key  # noqa: B018


def test_sequential_is_a_nested_typed_section(tmp_path):
    rule = parse_case(CASE_TEXT, tmp_path / "c.toml").protocol.sequential
    assert isinstance(rule, SequentialSpec)
    assert [f.name for f in dataclasses.fields(rule)] == list(SEQUENTIAL_KEYS)
    assert (rule.order_seed, rule.alpha, rule.spending, rule.max_prompts) == (1, 0.05, "pocock", None)


def test_to_dict_is_the_validated_table_in_schema_order(tmp_path):
    case = parse_case(CASE_TEXT, tmp_path / "c.toml")
    d = case.protocol.to_dict()
    assert list(d) == list(SCHEMA["protocol"]) and d["seeds"] == [2, 3, 4, 5]
    assert d["sequential"] == dict(zip(SEQUENTIAL_KEYS, (1, 2, 2, None, 0.05, "pocock", 0.1, None, None, None, 5, True)))
    assert type(SECTION_TYPES["protocol"].from_dict(d).sequential) is SequentialSpec
    # the string-key reads the report's tables and older callers use still answer the same
    assert case.protocol["steps"] == case.protocol.get("steps") == 25 and case.protocol.get("nope", 1) == 1
    assert dict(case.lora) == case.lora.to_dict()


def test_a_case_has_defaults_for_its_optional_sections(tmp_path):
    case = parse_case(CASE_TEXT, tmp_path / "c.toml")
    bare = Case(path=case.path, case=case.case, base_model=case.base_model, embedder=case.embedder, lora=case.lora,
                protocol=case.protocol, output=case.output, reference=case.reference, indicators=case.indicators,
                comparison=case.comparison)
    assert bare.report == case.report and bare.expert == case.expert and bare.claimed_works == case.claimed_works


# ----------------------------------------------------------------------------- no string-key reads


def _is_case(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in CASE_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr == "case"
    if isinstance(node, ast.Call):
        f = node.func
        return (f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)) in CASE_CALLS
    return False


def _is_section(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in SECTIONS and _is_case(node.value)


def _own_nodes(scope: ast.AST):
    """The nodes of ``scope``, not descending into the functions it defines (their own scopes)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo += list(ast.iter_child_nodes(node))


def _section_like(node: ast.AST) -> bool:
    if isinstance(node, ast.BoolOp):  # case.claimed_works or {}
        return _section_like(node.values[0])
    if isinstance(node, ast.IfExp):
        return _section_like(node.body) or _section_like(node.orelse)
    return _is_section(node)


def _bound(target: ast.AST, value: ast.AST) -> set[str]:
    """The names of ``target`` that ``value`` binds to a Case section, position by position."""
    if isinstance(target, ast.Name):
        return {target.id} if _section_like(value) else set()
    if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
            and len(target.elts) == len(value.elts):
        return set().union(*(_bound(t, v) for t, v in zip(target.elts, value.elts)))
    return set()


def _aliases(scope: ast.AST) -> set[str]:
    """Names bound in ``scope`` to a Case section (``p = case.protocol``, ``for _, s in ((.., case.lora),)``)."""
    out = set()
    for node in _own_nodes(scope):
        if isinstance(node, ast.Assign):
            out |= set().union(*(_bound(t, node.value) for t in node.targets))
        elif isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)):
            out |= set().union(set(), *(_bound(node.target, item) for item in node.iter.elts))
    return out


def string_key_reads(tree: ast.AST) -> list[int]:
    """Lines of ``x.<section>["key"]``, ``x.<section>.get(...)`` and the same on an alias."""
    lines = []
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]
    for scope in scopes:
        aliases = _aliases(scope)

        def held(n: ast.AST) -> bool:
            return _section_like(n) or (isinstance(n, ast.Name) and n.id in aliases)

        for node in _own_nodes(scope):
            if isinstance(node, ast.Subscript) and held(node.value) and isinstance(node.slice, ast.Constant) \
                    and isinstance(node.slice.value, str):
                lines.append(node.lineno)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("get", "items", "keys", "values") and held(node.func.value):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_the_checker_sees_the_forms_it_forbids():
    src = ("def f(case, prep):\n"
           "    a = case.protocol['steps']\n"
           "    b = prep.case.lora.get('scale')\n"
           "    p = case.protocol\n"
           "    c = p['seeds']\n"
           "    d = load_case(x).base_model['source']\n"
           "    e = case.protocol.steps\n"
           "    for role, s in (('lora', case.lora),):\n"
           "        s.get('sha256')\n"
           "def g(manifest):\n"
           "    p = manifest.protocol\n"
           "    return p['profiles'], manifest.protocol['profiles']\n")
    assert string_key_reads(ast.parse(src)) == [2, 3, 5, 6, 9]


def test_no_string_key_reads_of_case_sections_outside_case():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in SKIPPED:
            continue
        found += [f"{rel}:{line}" for line in string_key_reads(ast.parse(path.read_text("utf-8")))]
    assert not found, "Case sections read by string key (read attributes: case.protocol.steps):\n" + "\n".join(found)


# ----------------------------------------------------------------------------- RunOptions


def test_run_options_from_the_command_line():
    from carlos_audit.case.options import RunOptions

    opts = RunOptions.from_cli(no_progress=True, force=True, allow_partial=True, allow_unsafe_pickle=True,
                               allow_download=False, allow_incompatible=True)
    assert (opts.progress, opts.force, opts.allow_partial, opts.allow_download) == (False, True, True, False)
    # the recorded command carries the flags that change what is accepted, in a fixed order
    assert opts.command_flags() == ["--allow-partial", "--allow-incompatible", "--allow-unsafe-pickle"]
    assert RunOptions().command_flags() == [] and RunOptions().progress
    assert RunOptions.given(None, progress=False) == RunOptions(progress=False)
    assert RunOptions.given(opts, force=False) == dataclasses.replace(opts, force=False)
    with pytest.raises(TypeError):
        RunOptions.given(None, allow_everything=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.force = False


def test_the_cli_builds_run_options_once_and_records_the_flags(monkeypatch, tmp_path):
    """`run` hands the library one RunOptions and records the reproducing command line."""
    from click.testing import CliRunner

    import carlos_audit.pipeline as pipeline
    from carlos_audit.case.options import RunOptions
    from carlos_audit.cli import main
    from carlos_audit.errors import AuditError

    seen = {}

    def fake_run_full(case, out, options=None, *, argv=None, **flags):
        seen.update(case=case, options=options, argv=argv, flags=flags)
        raise AuditError("stopped by the test")

    monkeypatch.setattr(pipeline, "run_full", fake_run_full)
    cf = tmp_path / "c.toml"
    cf.write_text(CASE_TEXT.replace('path = "x.safetensors"', f'path = "{tmp_path / "x.safetensors"}"'))
    r = CliRunner().invoke(main, ["run", str(cf), "--out", str(tmp_path / "o"), "--no-progress", "--allow-partial",
                                  "--allow-download"])
    assert r.exit_code != 0 and "stopped by the test" in r.output
    assert seen["options"] == RunOptions(progress=False, allow_partial=True, allow_download=True) and not seen["flags"]
    assert seen["argv"] == ["carlos-audit", "run", str(cf), "--out", str(tmp_path / "o"), "--allow-partial"]


def test_a_case_pickles_with_its_sections(tmp_path):
    """Section types are bound to their names in casefile / sequential (process pools pickle them)."""
    import pickle

    case = parse_case(CASE_TEXT, tmp_path / "c.toml")
    again = pickle.loads(pickle.dumps(case))
    assert again == case and type(again.protocol.sequential) is SequentialSpec
    assert all(getattr(__import__("carlos_audit.case.casefile", fromlist=["x"]), t.__name__) is t
               for t in SECTION_TYPES.values())
