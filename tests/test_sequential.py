"""The pre-registered sequential protocol: the case-file table, the prompt order and looks, the
intervals for the full-protocol value (analysis/sequential_intervals.py), and a real run on the tiny models
against the same case run in full."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from carlos_audit.analysis import sequential_intervals as seq
from carlos_audit.analysis.metrics import consistency, strength
from carlos_audit.case.casefile import parse_case
from carlos_audit.case.protocol import Prompt, enumerate_pairs, load_prompts
from carlos_audit.case.sequential_plan import SequentialSpec, look_rows, plan_looks, prompt_order, run_pairs
from carlos_audit.errors import AuditError

REPO = Path(__file__).resolve().parents[1]
SEQ_CASE = REPO / "casefiles" / "demo-sequential.toml"


def case_text(table: str, seeds: str = "{ count = 4, start = 0 }", batch: int = 4, corpus: str = "") -> str:
    return f"""
[case]
id = "s"
title = "t"
examiner = "e"
question = "q"
[base_model]
source = "embedded:tiny-sd"
[embedder]
model = "embedded:tiny-clip"
[lora]
path = "x.safetensors"
[protocol]
prompts = "builtin:standard"
seeds = {seeds}
batch_size = {batch}
[protocol.sequential]
{table}
{corpus}
"""


GOOD = "order_seed = 1\nstep = 16\nmin_prompts = 16\nstrength_half_width = 0.1"


def test_table_defaults_and_absent(tmp_path):
    case = parse_case(case_text(GOOD), tmp_path / "c.toml")
    rule = case.protocol["sequential"]
    assert rule["alpha"] == 0.05 and rule["spending"] == "pocock" and rule["max_prompts"] is None
    assert rule["neighbour_k"] == 5 and rule["consistency_half_width"] is None
    plain = parse_case(case_text("").replace("[protocol.sequential]", ""), tmp_path / "c.toml")
    assert plain.protocol["sequential"] is None


@pytest.mark.parametrize("table, extra, message", [
    ("step = 16\nmin_prompts = 16\nstrength_half_width = 0.1", {}, "missing required key protocol.sequential.order_seed"),
    ("order_seed = 1\nstep = 16\nmin_prompts = 16", {}, "at least one stopping target"),
    ("order_seed = 1\nstep = 16\nmin_prompts = 16\npercentile_half_width = 5.0", {}, "needs a reference corpus"),
    (GOOD + "\nspending = \"haybittle\"", {}, "spending 'haybittle'"),
    (GOOD + "\nwhen = 3", {}, "unknown key protocol.sequential.when"),
    (GOOD + "\nmax_prompts = 8", {}, "max_prompts must be >= min_prompts"),
    (GOOD, {"seeds": "{ count = 6, start = 0 }"}, "must be a multiple of batch_size"),
    (GOOD.replace("min_prompts = 16", "min_prompts = 1"), {}, "min_prompts must be >= 2"),
    (GOOD + "\nalpha = 1.5", {}, "alpha must lie between 0 and 1"),
])
def test_table_refused(tmp_path, table, extra, message):
    with pytest.raises(AuditError, match=re.escape(message)):
        parse_case(case_text(table, **extra), tmp_path / "c.toml")


def test_check_prints_the_looks(tmp_path):
    from click.testing import CliRunner

    from carlos_audit.check import check_case
    from carlos_audit.cli import main

    r = check_case(SEQ_CASE)
    assert [(x["n_prompts"], x["images"]) for x in r["sequential"]["looks"]] == [(16, 128), (32, 256), (48, 384), (64, 512)]
    assert len(r["sequential"]["order"]) == 64
    out = CliRunner().invoke(main, ["check", str(SEQ_CASE)]).output
    assert "look 1: 16 prompts, 128 images (25% of the protocol)" in out
    assert "look 4: 64 prompts, 512 images (100% of the protocol)" in out
    bad = tmp_path / "big.toml"
    bad.write_text(SEQ_CASE.read_text().replace("min_prompts = 16", "min_prompts = 16\nmax_prompts = 80"))
    assert any("must not exceed the protocol's 64 prompts" in p for p in check_case(bad)["problems"])


def test_corpus_build_refuses_a_sequential_template(tmp_path):
    from carlos_audit.engines.build_plan import plan_build

    case = parse_case(case_text(GOOD), tmp_path / "c.toml")
    with pytest.raises(AuditError, match=re.escape("remove [protocol.sequential] from the template")):
        plan_build(tmp_path / "corpus", [("r1", tmp_path / "x.safetensors", case)])
    assert not (tmp_path / "corpus").exists()


def test_order_is_a_stratified_permutation():
    prompts, _ = load_prompts("builtin:standard")
    order = prompt_order(prompts, 7)
    assert sorted(order) == sorted(p.id for p in prompts)
    assert order == prompt_order(prompts, 7) and order != prompt_order(prompts, 8)
    sub = {p.id: (p.category, p.subcategory) for p in prompts}
    n_sub = len(set(sub.values()))
    for k in range(0, len(order), n_sub):  # every block of one prompt per subcategory is balanced
        assert Counter(sub[i] for i in order[k:k + n_sub]) == Counter({s: 1 for s in set(sub.values())})
    unequal = [Prompt(f"p{i}", "c", "a" if i < 6 else "b", str(i)) for i in range(8)]
    assert sorted(prompt_order(unequal, 0)) == sorted(p.id for p in unequal)


def test_looks_and_pairs_keep_the_full_batch_layout():
    prompts, _ = load_prompts("builtin:standard")
    rule = SequentialSpec(order_seed=3, step=20, min_prompts=10, max_prompts=None)
    plan = plan_looks(rule, prompts, 4)
    assert plan.looks == [10, 30, 50, 64]
    assert [r["images"] for r in look_rows(plan, 2)] == [80, 240, 400, 512]
    pairs = enumerate_pairs(prompts, [0, 1, 2, 3], 4)
    look2 = plan.pairs(pairs, 2)
    assert {p.prompt.id for p in look2} == set(plan.order[:30])
    full = {p.id: (p.batch, p.position) for p in pairs}
    assert all(full[p.id] == (p.batch, p.position) for p in look2)  # the full case's batches
    assert run_pairs(pairs, {"order": plan.order, "n_prompts_run": 30}) == look2
    with pytest.raises(AuditError, match="must not exceed the protocol's 64 prompts"):
        plan_looks(replace(rule, max_prompts=65), prompts, 4)


def test_spending_functions():
    t = [0.25, 0.5, 0.75, 1.0]
    for kind in ("pocock", "obrien-fleming"):
        a = seq.look_alphas(t, 0.05, kind)
        assert sum(a) == pytest.approx(0.05) and all(x > 0 for x in a)
    obf = seq.look_alphas(t, 0.05, "obrien-fleming")
    assert obf[0] < 1e-4 < obf[-1]  # O'Brien-Fleming spends almost nothing early
    poc = seq.look_alphas(t, 0.05, "pocock")
    assert poc[0] > obf[0] and poc == sorted(poc, reverse=True) and poc[0] / poc[-1] < 2.5  # Pocock: spread out


def test_a_look_that_spends_nothing_cannot_stop():
    d, ids = population()
    rule = dict(RULE, spending="obrien-fleming")
    ev = seq.evaluate_look(d[:8], ids[:8], 1, setting(rule, [0.001, 1.0], n_protocol=64, n_seeds=4, n_resamples=50, seed=0))
    assert ev["z"] is None and ev["strength"]["interval"] is None and not ev["met"]
    json.dumps(ev, allow_nan=False)


def population(n_prompts=64, n_seeds=4, dim=24, seed=0, dof=3.0):
    """One whole protocol of the coverage simulator's model (analysis/coverage.py); heavy-tailed
    by default (Student-t scale factors with ``dof`` degrees of freedom; None: Gaussian)."""
    from carlos_audit.analysis.coverage import Generator, Shape

    gen = Generator(Shape("t", effect=0.12, prompt_share=0.4, dof=dof, lowrank=4, dim=dim), seed)
    d = gen.draw(np.random.default_rng(seed), n_prompts, n_seeds)
    return d, [f"p{i:03d}" for i in range(n_prompts) for _ in range(n_seeds)]


RULE = {"alpha": 0.05, "spending": "pocock", "strength_half_width": 1.0, "consistency_half_width": 1.0,
        "percentile_half_width": None, "neighbour_stability": None, "neighbour_k": 3}


def spec(rule: dict) -> SequentialSpec:
    """``rule`` as the typed [protocol.sequential] table (the order keys do not enter a look's evaluation)."""
    return SequentialSpec(**{"order_seed": 0, "step": 1, "min_prompts": 2, **rule})


def setting(rule: dict, fractions: list, **kw) -> seq.LookSetting:
    return seq.LookSetting(spec(rule), fractions, **kw)


def test_whole_protocol_is_the_full_value_exactly():
    d, ids = population()
    ev = seq.evaluate_look(d, ids, 2, setting(RULE, [0.5, 1.0], n_protocol=64, n_seeds=4, n_resamples=100, seed=0))
    assert ev["strength"]["interval"] == [strength(d)] * 2 and ev["strength"]["half_width"] == 0
    assert ev["consistency"]["estimate"] == pytest.approx(consistency(d), abs=1e-12)
    assert ev["consistency"]["half_width"] == 0 and ev["met"]


def test_part_of_the_protocol_covers_the_full_value():
    """Subsets drawn without replacement from one protocol: the look-1 interval (level 1 - a_1 of
    2 looks) holds the full-protocol value in (nearly) every draw; more prompts, a narrower
    interval (the finite-population correction). Gaussian effects: at 16 prompts a heavy-tailed
    effect is refused by Cochran's rule instead (next test)."""
    d, ids = population(seed=1, dof=None)
    full = {"strength": strength(d), "consistency": consistency(d)}
    rng = np.random.default_rng(5)
    hits = Counter()
    widths = []
    for r in range(60):
        keep = set(rng.choice(64, 16, replace=False))
        rows = [i for i in range(len(ids)) if int(ids[i][1:]) in keep]
        ev = seq.evaluate_look(d[rows], [ids[i] for i in rows], 1, setting(RULE, [0.25, 1.0], n_protocol=64, n_seeds=4,
                                                                          n_resamples=200, seed=r))
        for key in full:
            lo, hi = ev[key]["interval"]
            hits[key] += lo <= full[key] <= hi
        widths.append(ev["strength"]["half_width"])
    assert hits["strength"] >= 56 and hits["consistency"] >= 56
    more = seq.evaluate_look(d[:160], ids[:160], 1, setting(RULE, [0.25, 1.0], n_protocol=64, n_seeds=4, n_resamples=200,
                                                            seed=0))
    assert more["strength"]["half_width"] < 0.8 * np.mean(widths)  # 40 of 64 prompts


def test_heavy_tails_at_few_prompts_do_not_stop():
    """Heavy-tailed effects at 16 and 32 of 64 prompts: where the normal interval is too short,
    Cochran's rule keeps the look from stopping (measured: analysis/sequential.normal_approximation)."""
    d, ids = population(seed=1)
    rng = np.random.default_rng(5)
    for n in (16, 32):
        for r in range(20):
            keep = set(rng.choice(64, n, replace=False))
            rows = [i for i in range(len(ids)) if int(ids[i][1:]) in keep]
            ev = seq.evaluate_look(d[rows], [ids[i] for i in rows], 1, setting(RULE, [n / 64, 1.0], n_protocol=64,
                                                                              n_seeds=4, n_resamples=100, seed=r))
            assert not ev["normal_approximation"]["met"] and not ev["met"]


def test_percentile_band_and_neighbour_stability(tmp_path):
    from carlos_audit.corpus.write import create_corpus

    d, ids = population(dim=24, seed=2)
    rng = np.random.default_rng(0)
    mean = d.mean(axis=0)
    dirs = np.vstack([mean + rng.standard_normal(24) * s for s in (0.05, 0.1, 0.15)] + [rng.standard_normal((40, 24))])
    corpus = create_corpus(tmp_path / "c", directions=dirs, name="t", signature=None,
                           rows={"id": [f"r{i}" for i in range(len(dirs))], "strength": rng.uniform(2, 9, len(dirs)),
                                 "consistency": rng.uniform(0, 0.5, len(dirs))})
    rule = dict(RULE, percentile_half_width=50.0, neighbour_stability=0.9)
    ev = seq.evaluate_look(d[:128], ids[:128], 1, setting(rule, [0.5, 1.0], n_protocol=64, n_seeds=4, n_resamples=200,
                                                          seed=0, corpus=corpus))
    lo, hi = ev["strength"]["interval"]
    assert ev["strength_percentile"]["band"] == [corpus.percentile("strength", lo, None),
                                                 corpus.percentile("strength", hi, None)]
    assert ev["neighbours"]["top_k"] == ["r0", "r1", "r2"] and ev["neighbours"]["stability"] > 0.9
    assert set(ev["targets"]) == {"strength_half_width", "consistency_half_width", "percentile_half_width",
                                  "neighbour_stability"}
    own = seq.evaluate_look(d[:128], ids[:128], 1, setting(rule, [0.5, 1.0], n_protocol=64, n_seeds=4, n_resamples=200,
                                                           seed=0, corpus=corpus, exclude_row=0))
    assert own["neighbours"]["top_k"][:2] == ["r1", "r2"]


def test_cochran_rule_blocks_a_skewed_look():
    rng = np.random.default_rng(0)
    ids = [f"p{i:03d}" for i in range(40) for _ in range(2)]
    even = rng.standard_normal((80, 8)) + 5
    skewed = even.copy()
    skewed[:2] *= 30  # one prompt far out: skewness ~6, Cochran asks for ~900 prompts
    ok, far = (seq.normal_approximation(x, ids) for x in (even, skewed))
    assert ok["met"] and ok["min_prompts"] < 40
    assert not far["met"] and far["skewness"] > 5
    wide = dict(RULE, strength_half_width=1e6, consistency_half_width=10.0)
    ev = seq.evaluate_look(skewed, ids, 1, setting(wide, [0.5, 1.0], n_protocol=80, n_seeds=2, n_resamples=100, seed=0))
    assert all(t["met"] for t in ev["targets"].values()) and not ev["met"]
    lax = seq.evaluate_look(skewed, ids, 1, setting(dict(wide, normal_check=False), [0.5, 1.0], n_protocol=80, n_seeds=2,
                                                    n_resamples=100, seed=0))
    assert lax["met"]


def test_the_run_judges_corpus_targets_without_the_case_s_own_row(tmp_path):
    from carlos_audit.corpus.write import create_corpus
    from carlos_audit.looks import open_reference

    dirs = np.random.default_rng(0).standard_normal((4, 8))
    create_corpus(tmp_path / "c", directions=dirs, name="t", signature=None,
                  rows={"id": ["a", "b", "c", "d"], "strength": [1.0, 2.0, 3.0, 4.0],
                        "lora_sha256": [None, "f" * 64, None, None]})
    rule = dict(RULE, percentile_half_width=5.0)
    corpus, own = open_reference(tmp_path / "c", "f" * 64, spec(rule))
    assert corpus.n == 4 and own == 1
    assert open_reference(tmp_path / "c", "f" * 64, spec(RULE)) == (None, None)  # no corpus target: not opened
    assert open_reference(None, "f" * 64, spec(rule)) == (None, None)


# ----------------------------------------------------------------------------- the tiny models


def full_case_text() -> str:
    """casefiles/demo-sequential.toml without its [protocol.sequential] table: the same case in full."""
    text = SEQ_CASE.read_text("utf-8")
    start = text.index("\n[protocol.sequential]\n")
    end = text.index("\n[indicators]\n")
    return text[:start] + text[end:].replace('id = "demo-sequential"', 'id = "demo-full"')


@pytest.fixture(scope="module")
def sequential_and_full(demo_assets, tmp_path_factory):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.pipeline import run_full
    from carlos_audit.pipeline import run_case

    root = tmp_path_factory.mktemp("sequential")
    full_file = root / "demo-full.toml"
    full_file.write_text(full_case_text())
    run_case(load_case(full_file), root / "full", progress=False)
    run_full(load_case(SEQ_CASE), root / "seq", progress=False)
    return root


@pytest.mark.slow
def test_sequential_units_are_the_full_case_units(sequential_and_full):
    from carlos_audit.fileio import read_json

    seq_dir, full_dir = sequential_and_full / "seq", sequential_and_full / "full"
    sm, fm = read_json(seq_dir / "manifest.json"), read_json(full_dir / "manifest.json")
    s = sm["sequential"]
    assert "sequential" not in fm and fm["protocol"]["n_prompts"] == 64
    assert s["stopped_early"] and s["n_prompts_run"] < 64 and s["images_saved"] > 0
    assert s["images_run"] + s["images_saved"] == s["images_full_protocol"] == 64 * 4 * 2
    assert sm["signature"] == fm["signature"]  # the same protocol
    assert {r["prompt_id"] for r in sm["pairs"]} == set(s["order"][:s["n_prompts_run"]])
    assert len(sm["pairs"]) == s["n_prompts_run"] * 4
    full_rows = {r["pair_id"]: r for r in fm["pairs"]}
    for r in sm["pairs"]:  # bit for bit: same batch, same position, same image and embedding bytes
        f = full_rows[r["pair_id"]]
        assert (r["batch"], r["position"]) == (f["batch"], f["position"])
        for arm in ("base", "lora"):
            for key in ("image_sha256", "embedding_sha256", "prompt"):
                assert r["arms"][arm][key] == f["arms"][arm][key]
    for unit in sorted((seq_dir / "units" / "lora").glob("b*.json")):
        assert (full_dir / "units" / "lora" / unit.name).read_bytes() != b""
        assert read_json(unit)["pairs"] == read_json(full_dir / "units" / "lora" / unit.name)["pairs"]
    # the interval at the stopping look holds the full-protocol value the full case measured
    seq_metrics, full_metrics = read_json(seq_dir / "metrics.json"), read_json(full_dir / "metrics.json")
    for key in ("strength", "consistency"):
        lo, hi = seq_metrics["sequential"][key]["interval"]
        assert lo <= full_metrics[key] <= hi
    assert seq_metrics["sequential"]["decision_reproduced"] is True
    assert "sequential" not in full_metrics


@pytest.mark.slow
def test_a_stopped_case_verifies_reanalyses_reports_and_joins_a_corpus(sequential_and_full, tmp_path):
    import subprocess

    from carlos_audit.analysis.case_analysis import analyse_case, reanalyse
    from carlos_audit.case.casefile import parse_case
    from carlos_audit.casefolder import CaseFolder
    from carlos_audit.corpus.add import add_case
    from carlos_audit.corpus.write import create_corpus, create_empty
    from carlos_audit.records import Manifest
    from carlos_audit.verify import check_sequential

    seq_dir = sequential_and_full / "seq"
    manifest = json.loads((seq_dir / "manifest.json").read_text())
    check = check_sequential(CaseFolder(seq_dir))
    assert check.ok and "as recorded" in check.detail
    assert reanalyse(seq_dir)["identical"]
    tampered = json.loads(json.dumps(manifest))
    tampered["sequential"]["looks"][-1]["met"] = not tampered["sequential"]["looks"][-1]["met"]
    folder = CaseFolder(seq_dir)
    folder.keep(Manifest.from_json(tampered))  # the tampered manifest, as if read from the folder
    assert not check_sequential(folder).ok
    text = subprocess.run(["pdftotext", "-layout", str(seq_dir / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    s = manifest["sequential"]
    assert re.search(rf"The case stopped at look {s['stopped_at_look']} of {s['n_looks']}", " ".join(text.split()))
    assert f"{s['images_saved']:,} images were not made" in " ".join(text.split())
    # a corpus row records that the case ran part of its protocol
    corpus = tmp_path / "corpus"
    create_empty(corpus, manifest["signature"], "t", dim=len(json.loads((seq_dir / "metrics.json").read_text())["direction"]))
    row = add_case(corpus, seq_dir)
    assert row["note"].startswith(f"sequential: stopped at look {s['stopped_at_look']} of {s['n_looks']}")
    # placed in a corpus: percentile bands from the ends of the full-protocol intervals
    rng = np.random.default_rng(0)
    metrics = json.loads((seq_dir / "metrics.json").read_text())
    dim = len(metrics["direction"])
    ref = create_corpus(tmp_path / "ref", directions=rng.standard_normal((30, dim)), name="ref",
                        signature=manifest["signature"],
                        rows={"id": [f"r{i}" for i in range(30)], "strength": rng.uniform(0, 0.3, 30),
                              "consistency": rng.uniform(0, 0.3, 30)})
    case = parse_case((seq_dir / "case.toml").read_text() + f'\n[reference]\ncorpus = "{tmp_path / "ref"}"\n',
                      tmp_path / "c.toml")
    _, comparison = analyse_case(seq_dir, Manifest.read(seq_dir), case)
    placed = comparison.target["sequential"]
    lo, hi = placed["strength"]["interval"]
    assert placed["strength_percentile"]["band"] == [ref.percentile("strength", lo, None), ref.percentile("strength", hi, None)]
    assert len(placed["neighbours"]["top_k"]) == 5 and 0 <= placed["neighbours"]["stability"] <= 1


@pytest.mark.slow
def test_resume_between_looks(sequential_and_full, tmp_path):
    """A run killed after an early look resumes through the unit records, to the same bytes."""
    import shutil

    from carlos_audit.case.casefile import load_case
    from carlos_audit.pipeline import run_case

    seq_dir = sequential_and_full / "seq"
    manifest = json.loads((seq_dir / "manifest.json").read_text())
    s = manifest["sequential"]
    first = set(s["order"][:s["planned_looks"][0]["n_prompts"]])
    later = {r["batch"] for r in manifest["pairs"] if r["prompt_id"] not in first}
    assert later  # the case ran more than one look
    work = tmp_path / "seq"
    shutil.copytree(seq_dir, work)
    for name in ("manifest.json", "manifest.json.sha256", "metrics.json", "comparison.json"):
        (work / name).unlink(missing_ok=True)
    for arm in ("base", "lora"):
        for b in later:
            (work / "units" / arm / f"b{b:05d}.json").unlink()
    run_case(load_case(SEQ_CASE), work, progress=False)
    again = json.loads((work / "manifest.json").read_text())
    assert again["pairs"] == manifest["pairs"] and again["sequential"] == s
    assert (work / "metrics.json").read_bytes() == (seq_dir / "metrics.json").read_bytes()
    assert again["run"]["stats"]["lora"]["generated_batches"] == len(later)


@pytest.mark.slow
def test_a_stopped_case_exports_and_reproduces(sequential_and_full, demo_assets, tmp_path):
    from carlos_audit.kit.export import export_case
    from carlos_audit.kit.reproduce import reproduce

    seq_dir = sequential_and_full / "seq"
    export_case(seq_dir, tmp_path / "kit.zip")
    rep = reproduce(tmp_path / "kit.zip", tmp_path / "repro", lora=demo_assets["loras"]["target"], sample=2,
                    progress=False, render=False)
    assert rep["verdict"] == "identical"
    assert rep["summary"]["pairs_in_case"] == len(json.loads((seq_dir / "manifest.json").read_text())["pairs"]) < 64 * 4
