"""Case file validation: precise one-line errors, and the prompt sources a case can name."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import REPO

from carlos_audit.case.casefile import load_case, output_dir
from carlos_audit.case.protocol import (
    CARLOS_INDEXING_SHA256,
    load_prompts,
    prompts_sha256,
    resolve_seeds,
)
from carlos_audit.cli import main
from carlos_audit.errors import AuditError

GOOD = (REPO / "casefiles" / "demo.toml").read_text()


def _write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _cli_error(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    out = r.output.strip()
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("Error: ")
    return out


def test_demo_casefile_is_valid():
    case = load_case(REPO / "casefiles" / "demo.toml")
    assert case.id == "demo"
    assert case.protocol["seeds"] == [0, 1, 2, 3]
    assert case.lora["trigger_policy"] == "both"


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda t: t + "\n[bogus]\nx = 1\n", ["unknown section", "[bogus]"]),
        (lambda t: t.replace('exhibit = "Exhibit D-1"', 'exhibit = "E"\ncolour = "red"'), ["unknown key", "case.colour", "allowed"]),
        (lambda t: t.replace("steps = 10", 'steps = "ten"'), ["protocol.steps", "must be a integer", "str"]),
        (lambda t: t.replace("scale = 1.0", "scale = [1]"), ["lora.scale", "number"]),
        (lambda t: t.replace('trigger_policy = "both"', 'trigger_policy = "sometimes"'), ["trigger_policy", "both, lora_only, none"]),
        (lambda t: t.replace('id = "demo"', 'id = "../escape"'), ["case.id", "not allowed"]),
        (lambda t: t.replace("seeds = { count = 4, start = 0 }", "seeds = []"), ["protocol.seeds", "non-empty list"]),
        (lambda t: t.replace("seeds = { count = 4, start = 0 }", "seeds = [1, 1]"), ["duplicates"]),
        (lambda t: t.replace("width = 64", "width = 65"), ["protocol.width", "multiple of 8"]),
        (lambda t: t.replace('source = "embedded:tiny-sd"\n', ""), ["missing required key", "base_model.source"]),
        (lambda t: t.replace('[embedder]\nmodel = "embedded:tiny-clip"\n', ""), ["missing section", "[embedder]"]),
        (lambda t: t.replace('dtype = "float32"', 'dtype = "float8"'), ["base_model.dtype", "allowed"]),
        (lambda t: t.replace('[case]', '[case\n'), ["malformed TOML"]),
    ],
)
def test_bad_casefiles_give_precise_errors(tmp_path, mutate, words):
    p = _write(tmp_path, mutate(GOOD))
    with pytest.raises(AuditError) as e:
        load_case(p)
    msg = str(e.value)
    assert str(p) in msg
    for w in words:
        assert w in msg, (w, msg)
    out = _cli_error(["run", str(p)])
    for w in words:
        assert w in out


def test_missing_casefile_cli(tmp_path):
    out = _cli_error(["run", str(tmp_path / "nope.toml")])
    assert "case file not found" in out


def test_nonexistent_prompt_sets(tmp_path):
    with pytest.raises(AuditError, match="unknown builtin prompt suite 'nope'; allowed: builtin:standard, builtin:demo, builtin:retrieval"):
        load_prompts("builtin:nope")
    with pytest.raises(AuditError, match="prompt file not found"):
        load_prompts("missing.json", tmp_path)
    bad = _write(tmp_path, "{not json", "p.json")
    with pytest.raises(AuditError, match="cannot parse prompt file"):
        load_prompts(str(bad))
    p = _write(tmp_path, GOOD.replace('prompts = "builtin:demo"', 'prompts = "builtin:nope"'))
    out = _cli_error(["run", str(p)])
    assert "builtin:nope" in out


def test_prompt_file_formats(tmp_path):
    txt = _write(tmp_path, "# comment\na red car\n\na blue boat\n", "p.txt")
    prompts, src = load_prompts(str(txt))
    assert [p.text for p in prompts] == ["a red car", "a blue boat"] and src["kind"] == "file"
    toml = _write(tmp_path, '[animals]\npets = ["a cat", "a dog"]\n[places]\ncities = ["a street"]\n', "p.toml")
    prompts, _ = load_prompts(str(toml))
    assert [(p.id, p.category, p.subcategory) for p in prompts] == [
        ("p001", "animals", "pets"), ("p002", "animals", "pets"), ("p003", "places", "cities")]
    std, _ = load_prompts("builtin:standard")
    assert len({p.category for p in std}) >= 8 and len(std) == 64
    demo, _ = load_prompts("builtin:demo")
    assert len(demo) == 8 and {p.text for p in demo} <= {p.text for p in std}


def test_carlos_prompts_json_loads_indexing_set(carlos_reference):
    prompts, _ = load_prompts(str(carlos_reference / "carlos_prompts.json"))
    assert len(prompts) == 280
    assert len({p.category for p in prompts}) == 10
    assert len({(p.category, p.subcategory) for p in prompts}) == 35
    assert prompts_sha256(prompts) == CARLOS_INDEXING_SHA256


def test_seeds_forms():
    assert resolve_seeds({"count": 3, "start": 5}) == [5, 6, 7]
    assert resolve_seeds([4, 2]) == [4, 2]


def test_output_dir_stays_inside_reports(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    for bad in ("../x", "/tmp/x", "reports/../../x"):
        p = _write(tmp_path, GOOD + f'\n[output]\ndir = "{bad}"\n')
        with pytest.raises(AuditError, match="output.dir"):
            output_dir(load_case(p), reports_root=reports)
    (reports / "link").symlink_to(tmp_path)
    p = _write(tmp_path, GOOD + '\n[output]\ndir = "reports/link/x"\n')
    with pytest.raises(AuditError, match="escapes the reports folder"):
        output_dir(load_case(p), reports_root=reports)
    ok = output_dir(load_case(_write(tmp_path, GOOD)), reports_root=reports)
    assert ok == (reports / "demo").resolve()
    explicit = output_dir(load_case(_write(tmp_path, GOOD)), out=str(tmp_path / "anywhere"))
    assert explicit == (tmp_path / "anywhere").resolve()
