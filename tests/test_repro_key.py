"""One reproducibility-key builder (case/signature.key_params + reproducibility_key) for the run's
base-image cache and the corpus build's shared base arm: a Flux build and a Flux run key the same
generation parameters (max_sequence_length included); the Stable Diffusion keys are unchanged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from carlos_audit.case.casefile import load_case
from carlos_audit.case.protocol import enumerate_pairs, load_prompts

REPO = Path(__file__).resolve().parents[1]
#: a fixed CPU environment record (only its bits_environment part is keyed)
ENV = {"device": "cpu", "dtype": "float32", "python": "3.11.9", "machine": "x86_64", "platform": "Linux",
       "torch_threads": 2, "packages": {"torch": "2.14.1", "diffusers": "0.42.0"}}


def _case(name: str):
    return replace(load_case(REPO / "casefiles" / name), path=Path("/cases") / name)  # keys hold no local path


def _first_batch(case):
    from carlos_audit.run.arms import plan_arms

    prompts, _ = load_prompts(case.protocol["prompts"], case.base_dir)
    pc = case.protocol
    pairs = [p for p in enumerate_pairs(prompts, pc["seeds"], pc["batch_size"]) if p.batch == 0]
    return plan_arms(case, "target", []).arms["base"], pairs


def _keys(case, monkeypatch) -> tuple[dict, dict]:
    """The description the corpus build keys its shared base arm with, and the one the run keys the
    same batch with in its base-image cache."""
    from carlos_audit.case import signature
    from carlos_audit.engines.build_plan import shared_arm_key
    from carlos_audit.run.generate import GenerationParams
    from carlos_audit.run.profile import Session

    arm, pairs = _first_batch(case)
    seen = []
    real = signature.reproducibility_key
    monkeypatch.setattr(signature, "reproducibility_key", lambda **kw: seen.append(real(**kw)) or seen[-1])
    build_key = shared_arm_key(case, arm, pairs, ENV)
    pc = case.protocol
    session = Session(case, None, None, SimpleNamespace(sha256="0" * 64, watermarker=None), None,
                      GenerationParams.from_protocol(pc, pc["scheduler"]), [], None, ENV, pc["batch_size"])
    words = list(case.lora["trigger_words"])
    run_key, run_desc = session.cache_key([arm.prompt_for(p.prompt.text, words) for p in pairs], [p.seed for p in pairs])
    assert seen[0][0] == build_key
    return seen[0][1], run_desc | {"key": run_key, "build_key": build_key}


def test_a_flux_build_and_a_flux_run_key_the_same_generation_parameters(monkeypatch):
    build, run = _keys(_case("demo-flux.toml"), monkeypatch)
    assert build["params"] == run["params"]
    assert build["params"]["max_sequence_length"] == run["params"]["max_sequence_length"] is not None
    assert build["batch"] == run["batch"] and build["environment"] == run["environment"]


def test_the_stable_diffusion_keys_are_unchanged(monkeypatch):
    build, run = _keys(_case("demo.toml"), monkeypatch)
    assert build["params"] == run["params"] and "max_sequence_length" not in run["params"]
    # the bytes of both keys as they were before the build and the run shared one builder
    assert run["key"] == "8a8c88ca6c8e5565ec2666deeb4de026415c1f9bc897e404c43d3911ff126766"
    assert run["build_key"] == "744071fd6a1b7b5c2922ea95c3fda54d64b6d5d304c575617c24ca660c60fce7"
