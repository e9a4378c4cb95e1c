"""The analysis step alone (issue 13): `carlos-audit analyse CASE_DIR` recomputes metrics.json and
comparison.json from a finished case folder with no model and no torch, byte-identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from click.testing import CliRunner
from conftest import REPO

from carlos_audit.cli import main
from carlos_audit.hashing import sha256_file


def _tree(case_dir) -> dict:
    return {p.relative_to(case_dir).as_posix(): sha256_file(p) for p in sorted(case_dir.rglob("*")) if p.is_file()}


def test_analyse_reproduces_the_demo_results_without_torch(demo_case_dir, tmp_path):
    before = _tree(demo_case_dir)
    code = ("import sys\n"
            "for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'peft'):\n"
            "    sys.modules[m] = None  # any import of them fails\n"
            "from carlos_audit.cli import main\n"
            f"main([ 'analyse', {str(demo_case_dir)!r}, '--out', {str(tmp_path / 'again')!r}, '--json'])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["identical"] and set(result["results"]) == {"metrics.json", "comparison.json"}
    for name in ("metrics.json", "comparison.json"):
        assert (tmp_path / "again" / name).read_bytes() == (demo_case_dir / name).read_bytes()
    assert _tree(demo_case_dir) == before  # the case folder is never written


def test_analyse_names_a_result_that_does_not_follow_from_the_features(demo_case_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(demo_case_dir, case)
    m = json.loads((case / "manifest.json").read_text())
    emb = case / m["pairs"][0]["arms"]["lora"]["embedding"]
    np.save(emb, np.load(emb) * 2.0)
    before = _tree(case)
    r = CliRunner().invoke(main, ["analyse", str(case)])
    assert r.exit_code == 3, r.output
    assert "DIFF  metrics.json" in r.output and "does not reproduce" in r.output
    assert _tree(case) == before


def test_the_scale_1_dose_response_interval_is_the_main_interval(demo_case_dir):
    """One cluster bootstrap, one draw layout: the dose-response point at the case's own scale
    carries the main intervals, and the indicators resample the prompts the main intervals drew."""
    from carlos_audit.analysis.indicators import prompt_resamples
    from carlos_audit.analysis.metrics import bootstrap, diffs, draw_groups, percentile_ci, strength
    from carlos_audit.records import Manifest, Metrics
    from carlos_audit.casefolder.unit_store import CaseStore

    m, manifest = Metrics.read(demo_case_dir), Manifest.read(demo_case_dir)
    (point,) = [p for p in m.indicators["dose_response"]["points"] if p["scale"] == manifest.lora["scale"] == 1.0]
    assert point["strength_ci"] == m.ci["strength"] and point["consistency_ci"] == m.ci["consistency"]
    assert point["strength"] == m.strength
    # the draws: the index arrays of prompt_resamples are the groups draw_groups picks
    ids = [r["pair_id"] for r in manifest.pairs]
    prompts = [r["prompt_id"] for r in manifest.pairs]
    labels = sorted(set(prompts))
    picks = draw_groups(len(labels), 50, 0)
    boots = prompt_resamples(prompts, 50, 0)
    assert [sorted({prompts[i] for i in b}) for b in boots] == [sorted({labels[j] for j in row}) for row in picks]
    b, l = manifest.protocol["profiles"]["main"]
    store = CaseStore(demo_case_dir)
    d = diffs(store.features(l, ids), store.features(b, ids))
    assert np.allclose(percentile_ci(strength(d[x]) for x in boots), bootstrap(d, np.array(prompts), 50, 0)["strength"],
                       rtol=1e-12)
