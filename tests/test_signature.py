"""One definition of "same numbers": the case signature and the reproducibility key (case/signature.py)."""

from __future__ import annotations

from pathlib import Path

from carlos_audit.case.casefile import parse_case
from carlos_audit.case.protocol import load_prompts, prompts_sha256
from carlos_audit.case.signature import (
    SIGNATURE_FIELDS,
    case_signature,
    environment_differences,
    reproducibility_key,
)

ENV = {"python": "3.11.2", "platform": "Linux-6.1-x86_64", "machine": "x86_64", "processor": None,
       "packages": {"carlos-audit": "0.1.0", "torch": "2.4.1", "diffusers": "0.32.0", "transformers": "4.44.0",
                    "peft": "0.12.0", "pillow": "10.4.0", "weasyprint": "62.3"},
       "device": "cpu", "dtype": "float32", "torch_threads": 4, "omp_wait_policy": None, "cuda": None, "gpu": None,
       "determinism": {}}


def _key(env: dict, **kw) -> str:
    args = dict(base_model="ab" * 32, params={"steps": 4, "guidance_scale": 5.0}, batch_size=2,
                prompts_sent=["a cat", "a dog"], seeds=[0, 1], environment=env) | kw
    return reproducibility_key(**args)[0]


def test_every_field_that_changes_bits_changes_the_key():
    base = _key(ENV)
    changed = [dict(ENV, torch_threads=2), dict(ENV, device="cuda"), dict(ENV, dtype="float16"),
               dict(ENV, machine="aarch64"), dict(ENV, platform="Darwin-23.1-arm64"), dict(ENV, python="3.12.0"),
               dict(ENV, gpu="NVIDIA H100"),
               dict(ENV, packages=dict(ENV["packages"], torch="2.5.0")),
               dict(ENV, packages=dict(ENV["packages"], pillow="11.0.0")),
               dict(ENV, fastpath={"active": True, "sdpa": True})]
    keys = [_key(e) for e in changed]
    assert base not in keys and len(set(keys)) == len(keys)
    assert [environment_differences(ENV, e) for e in changed] == [
        ["torch_threads"], ["device"], ["dtype"], ["machine"], ["platform"], ["python"], ["gpu"], ["packages.torch"],
        ["packages.pillow"], ["fastpath"]]
    for kw in ({"seeds": [0, 2]}, {"prompts_sent": ["a cat", "a dog tgtstyle"]}, {"batch_size": 1},
               {"params": {"steps": 5, "guidance_scale": 5.0}}, {"base_model": "cd" * 32}):
        assert _key(ENV, **kw) != base


def test_what_does_not_change_bits_leaves_the_key_alone():
    same = [dict(ENV, processor="x86_64", omp_wait_policy="PASSIVE", determinism={"x": 1}),
            dict(ENV, packages=dict(ENV["packages"], weasyprint="63.0")),
            dict(ENV, fastpath={"active": False, "reason": "cpu"})]
    for env in same:
        assert _key(env) == _key(ENV)
        assert environment_differences(ENV, env) == []


CASE = """
[case]
id = "sig"
title = "t"
examiner = "pytest"
question = "q"
[base_model]
source = "tiny:sd"
[embedder]
model = "tiny:clip"
[lora]
path = "x.safetensors"
[protocol]
prompts = "builtin:demo"
seeds = [0, 1]
steps = 3
"""


def test_the_case_signature_has_every_field_in_order():
    case = parse_case(CASE, Path("/nonexistent/case.toml"))
    prompts, _ = load_prompts(case.protocol["prompts"], case.base_dir)
    sig = case_signature(case, prompts, base_model="local:x", base_model_sha256="ab" * 32, embedder="e",
                         embedder_sha256=None, scheduler="DDIMScheduler")
    assert tuple(sig) == SIGNATURE_FIELDS
    assert sig["steps"] == 3 and sig["seeds"] == [0, 1] and sig["prompts_sha256"] == prompts_sha256(prompts)
    assert sig["scheduler"] == "DDIMScheduler" and sig["trigger_policy"] == "both"
