"""Inputs validated before anything is generated (docs/hostile/spoof.md): case-file numbers
finite and in range at `check` (so `run` refuses too), LoRA weights that are no trained weights
warned at `inspect` and refused by `check` and `run`, a rank-0 LoRA one line everywhere."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, write_case
from safetensors.numpy import save_file

from carlos_audit.case.casefile import load_case
from carlos_audit.case.limits import SEED_LIMIT
from carlos_audit.cli import main
from carlos_audit.errors import AuditError
from carlos_audit.lora.fileformat import LoraFile
from carlos_audit.lora.inspection import MAX_PLAUSIBLE_WEIGHT, inspect_lora, weight_faults

GOOD = (REPO / "casefiles" / "demo.toml").read_text()
KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def one_line_error(args) -> str:
    r = CliRunner().invoke(main, args)
    out = r.output.strip()
    assert r.exit_code != 0, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("Error: ")
    return out


# ----------------------------------------------------------------------------- case file numbers


@pytest.mark.parametrize("old, new, words", [
    ("scale = 1.0", "scale = nan", ["lora.scale", "finite number"]),
    ("scale = 1.0", "scale = inf", ["lora.scale", "finite number"]),
    ("scale = 1.0", "scale = -inf", ["lora.scale", "finite number"]),
    ("scale = 1.0", "scale = 1e30", ["lora.scale", "0..100", "1e+30"]),
    ("scale = 1.0", "scale = 1" + "0" * 400, ["lora.scale", "finite number"]),
    ("scale = 1.0", "scale = -0.5", ["lora.scale", "0..100"]),
    ("guidance_scale = 5.0", "guidance_scale = nan", ["protocol.guidance_scale", "finite number"]),
    ("guidance_scale = 5.0", "guidance_scale = inf", ["protocol.guidance_scale", "finite number"]),
    ("guidance_scale = 5.0", "guidance_scale = 1e30", ["protocol.guidance_scale", "0..100"]),
    ("scales = [0.5, 2.0]", "scales = [0.5, nan]", ["protocol.scales", "finite numbers"]),
    ("scales = [0.5, 2.0]", "scales = [0.5, 1e30]", ["protocol.scales", "0..100"]),
    ("steps = 10", "steps = 1001", ["protocol.steps", "1..1000"]),
    ("seeds = { count = 4, start = 0 }", f"seeds = [{2 ** 64 + 1}]", ["protocol.seeds", "2**64-1", str(2 ** 64 + 1)]),
    ("seeds = { count = 4, start = 0 }", f"seeds = {{ count = 2, start = {2 ** 64 - 1} }}", ["protocol.seeds", str(2 ** 64)]),
])
def test_case_numbers_out_of_range_are_refused_at_check_and_run(tmp_path, old, new, words):
    assert old in GOOD
    p = tmp_path / "c.toml"
    p.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(AuditError) as e:
        load_case(p)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    for cmd in ("check", "run"):
        out = one_line_error([cmd, str(p)])
        assert all(w in out for w in words), out


def test_the_largest_seed_and_the_range_bounds_are_accepted(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(GOOD.replace("seeds = { count = 4, start = 0 }", f"seeds = [0, {SEED_LIMIT - 1}]")
                 .replace("scale = 1.0", "scale = 100").replace("guidance_scale = 5.0", "guidance_scale = 0")
                 .replace("steps = 10", "steps = 1000"))
    case = load_case(p)
    assert case.protocol.steps == 1000
    assert case.protocol.seeds == [0, SEED_LIMIT - 1] and case.lora.scale == 100.0
    assert case.protocol.guidance_scale == 0.0


# ----------------------------------------------------------------------------- LoRA weights


def lora_file(path, *, down=None, up=None, alpha=None):
    rng = np.random.default_rng(0)
    t = {f"{KEY}.lora_down.weight": rng.standard_normal((4, 64)).astype(np.float32) if down is None else down,
         f"{KEY}.lora_up.weight": rng.standard_normal((64, 4)).astype(np.float32) * 0.01 if up is None else up}
    if alpha is not None:
        t[f"{KEY}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(t, str(path))
    return path


def with_value(v):
    d = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    d[2, 5] = v
    return d


BAD_WEIGHTS = {
    "nan": (dict(down=with_value(np.nan)), "1 non-finite value(s) (NaN or Inf) in tensor"),
    "inf": (dict(down=with_value(-np.inf)), "1 non-finite value(s) (NaN or Inf) in tensor"),
    "huge": (dict(down=with_value(1e30)), "a weight of magnitude 1e+30 (above the plausible 10000) in tensor"),
    "integer": (dict(down=np.ones((4, 64), dtype=np.int32)), "integer dtype I32 where weights are stored, in tensor"),
    "negative_alpha": (dict(alpha=-4.0), "alpha -4.0 is negative, in module"),
    "nan_alpha": (dict(alpha=float("nan")), "alpha nan is not a number, in module"),
}


@pytest.mark.parametrize("name", sorted(BAD_WEIGHTS))
def test_bad_weights_are_warned_at_inspect(tmp_path, name):
    kwargs, words = BAD_WEIGHTS[name]
    p = lora_file(tmp_path / f"{name}.safetensors", **kwargs)
    faults = weight_faults(LoraFile(p))
    assert len(faults) == 1 and words in faults[0], faults
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 0, r.output
    assert f"WARNING         {faults[0]}"[:60] in r.output and "`run` and `check` refuse this file" in r.output
    r = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert words in r.output


def test_plausible_weights_have_no_fault(tmp_path):
    p = lora_file(tmp_path / "ok.safetensors", down=with_value(MAX_PLAUSIBLE_WEIGHT), alpha=4.0)
    assert weight_faults(LoraFile(p)) == []
    assert "WARNING" not in CliRunner().invoke(main, ["inspect", str(p)]).output


def test_rank0_lora_is_one_line_at_inspect(tmp_path):
    p = lora_file(tmp_path / "rank0.safetensors", down=np.zeros((0, 64), np.float32), up=np.zeros((64, 0), np.float32))
    with pytest.raises(AuditError, match="rank 0"):
        inspect_lora(p)
    out = one_line_error(["inspect", str(p)])
    assert "rank 0" in out and "changes no weight" in out


@pytest.mark.parametrize("name", ["nan", "huge", "integer", "negative_alpha", "rank0"])
def test_bad_weights_are_refused_by_check_and_before_generation(lite_assets, tmp_path, name):
    if name == "rank0":
        p = lora_file(tmp_path / "rank0.safetensors", down=np.zeros((0, 64), np.float32), up=np.zeros((64, 0), np.float32))
        words = "rank 0"
    else:
        kwargs, words = BAD_WEIGHTS[name]
        p = lora_file(tmp_path / f"{name}.safetensors", **kwargs)
    cf = write_case(tmp_path, lite_assets, lora=str(p), case_id=f"bad-{name.replace('_', '-')}")
    r = CliRunner().invoke(main, ["check", str(cf)])
    assert "NOT ready" in r.output and words in r.output and "Traceback" not in r.output, r.output
    out = one_line_error(["run", str(cf), "--out", str(tmp_path / "out"), "--no-progress"])
    assert words in out
    assert not (tmp_path / "out" / "images").exists()  # nothing generated
