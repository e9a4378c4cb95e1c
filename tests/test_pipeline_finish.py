"""The pipeline's two halves (pipeline.py): generation stops at "units generated" and writes its
run record; the model-free finish step (analysis, manifest, custody) needs nothing else. The
corpus build's finalize unit runs only that step, with torch imports refused."""

from __future__ import annotations

import pickle
import subprocess
import sys

from conftest import REPO, write_case

from carlos_audit.case.casefile import load_case
from carlos_audit.engines.driver import FINALIZE_INPUTS
from carlos_audit.engines.units import WorkUnit
from carlos_audit.fileio import read_json
from carlos_audit.pipeline import run_case
from carlos_audit.records import RunRecord

BLOCK_TORCH = '''
import sys, pickle
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "open_clip", "peft"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Refuse())
from carlos_audit.engines.units import run_unit
unit, files = pickle.load(open(sys.argv[1], "rb"))
result = run_unit(unit, 1, files)
assert not any(m.split(".")[0] == "torch" for m in sys.modules)
pickle.dump(result, open(sys.argv[2], "wb"))
'''


def _without_run_times(m: dict) -> dict:
    return m | {"run": {k: v for k, v in m["run"].items() if k not in ("finished_utc", "command")}}


def test_finalize_loads_no_model_and_writes_what_the_run_wrote(demo_assets, tmp_path):
    cf = write_case(tmp_path, demo_assets, case_id="fin")
    out = tmp_path / "out"
    run_case(load_case(cf), out, progress=False)
    record = RunRecord.read(out)  # what generation left for the finish step
    manifest = read_json(out / "manifest.json")
    assert record.base_model == manifest["base_model"] and record.environment == manifest["environment"]
    assert record.lora_load == manifest["lora"]["load"]

    files = {p.relative_to(out).as_posix(): p.read_bytes()
             for pattern in FINALIZE_INPUTS for p in sorted(out.glob(pattern)) if p.is_file()}
    assert "units/generation.json" in files and not any(k.startswith("images/") for k in files)
    unit = WorkUnit("finalize", case_id="fin", case_text=cf.read_text("utf-8"), case_path=str(cf),
                    lora_path=manifest["lora"]["path"], lora_sha256=manifest["lora"]["sha256"], store=str(out),
                    argv=("carlos-audit", "run", str(cf)))
    (tmp_path / "unit.pkl").write_bytes(pickle.dumps((unit, files)))
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(tmp_path / "unit.pkl"), str(tmp_path / "res.pkl")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = pickle.loads((tmp_path / "res.pkl").read_bytes())
    written = dict(result["files"])
    assert [f[0] for f in result["files"]][-2:] == ["manifest.json", "manifest.json.sha256"]
    assert written["metrics.json"] == (out / "metrics.json").read_bytes()
    import json

    assert _without_run_times(json.loads(written["manifest.json"])) == _without_run_times(manifest)
