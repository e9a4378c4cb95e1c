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
