"""Bits decided per device class (issue 24): the reproducibility key on CUDA (CUDA queries stubbed
at the torch boundary) and on the CPU (unchanged), TF32 off unless asked, the watermarker and
the embedder's preprocessing pinned and recorded, one device class per shared arm."""

from __future__ import annotations

import types

import pytest
import torch

from carlos_audit.case.signature import bits_environment, environment_differences, reproducibility_key
from carlos_audit.errors import AuditError
from carlos_audit.run import devices
from carlos_audit.run.environment import apply_determinism, capture

KEY_ARGS = dict(base_model="abc", params={"steps": 4}, batch_size=2, prompts_sent=["a", "b"], seeds=[0, 1])


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda answering as a node of H100s (0, 2, 3) and one A100 (1), driver 550.54."""
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA A100-SXM4-80GB", 2: "NVIDIA H100 80GB HBM3", 3: "NVIDIA H100 80GB HBM3"}
    state = {"driver": "550.54.15"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 0) if i == 1 else (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(devices, "nvidia_driver", lambda: state["driver"])
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield state
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.benchmark) = flags


def _key(env) -> str:
    return reproducibility_key(**KEY_ARGS, environment=env)[0]


def test_the_cpu_key_is_unchanged():
    """The key of a CPU environment record is byte-identical to the one every earlier version
    computed (value taken from the code before issue 24), so existing base-image caches hold."""
    env = {"python": "3.12.3", "platform": "Linux-x", "machine": "x86_64", "processor": None,
           "packages": {"torch": "2.14.1", "numpy": "2.1"}, "device": "cpu", "dtype": "float32", "torch_threads": 2,
           "omp_wait_policy": "PASSIVE", "cuda": None, "gpu": None, "determinism": {}}
    assert _key(env) == "a6862ee5b940123d0a59aa53e401fcc5c616f061f9076e0f439d11dab8e1b213"
    assert _key(env | {"torch_threads": 1}) != _key(env)  # on the CPU the thread count changes bits
    assert "gpu_capability" not in bits_environment(env) and "torch_threads" in bits_environment(env)


def test_the_cuda_key_holds_the_gpu_driver_libraries_and_flags_not_the_cpu(fake_gpu):
    det = apply_determinism("cuda:0")
    env = capture("cuda:0", "float16", det)
    assert env["gpu"] == "NVIDIA H100 80GB HBM3" and env["driver"] == "550.54.15" and env["cudnn"] == 90100
    assert env["tf32"] == {"matmul": False, "cudnn": False} and det["tf32"]["requested"] is False
    assert env["determinism_flags"]["cudnn_deterministic"] and not env["determinism_flags"]["cudnn_benchmark"]
    bits = bits_environment(env)
    assert "torch_threads" not in bits and "platform" not in bits and bits["device"] == "cuda"
    k = _key(env)
    # not the CPU: thread count, platform, machine, python
    assert _key(env | {"torch_threads": 1, "platform": "other", "machine": "aarch64", "python": "3.13"}) == k
    assert _key(capture("cuda:0", "float16", det) | {"device": "cuda:3"}) == k  # the index is not the class
    assert _key(capture("cuda:1", "float16", det)) != k  # another GPU model
    fake_gpu["driver"] = "560.28.03"
    assert _key(capture("cuda:0", "float16", det)) != k
    fake_gpu["driver"] = "550.54.15"
    assert _key(capture("cuda:0", "bfloat16", det)) != k
    apply_determinism("cuda:0", tf32=True)
    tf32_env = capture("cuda:0", "float16", det)
    assert tf32_env["tf32"] == {"matmul": True, "cudnn": True} and _key(tf32_env) != k
    assert "tf32" in environment_differences(env, tf32_env)
    assert environment_differences(env, dict(env, device="cpu")) == ["device"]


def test_apply_determinism_on_the_cpu_records_no_cuda_flags():
    assert "tf32" not in apply_determinism("cpu")


def test_units_of_one_shared_arm_must_share_a_device_class(fake_gpu):
    a = devices.device_record(capture("cuda:0", "float16", {}))
    b = devices.device_record(capture("cuda:3", "float16", {}))
    c = devices.device_record(capture("cuda:1", "float16", {}))
    assert a["class"] == "cuda" and a["bits"] == b["bits"] != c["bits"]
    devices.check_one_class("base-x", [{"batch": 0, "device": a}, {"batch": 1, "device": b}])
    with pytest.raises(AuditError, match="one device class"):
        devices.check_one_class("base-x", [{"batch": 0, "device": a}, {"batch": 1, "device": c}])


def test_the_watermarker_is_passed_explicitly_where_the_pipeline_takes_it():
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from carlos_audit.models.pinned import watermark_kwargs, watermark_record

    assert watermark_kwargs(StableDiffusionXLPipeline, False) == {"add_watermarker": False}
    assert watermark_kwargs(StableDiffusionPipeline, False) == {}
    rec = watermark_record(types.SimpleNamespace(watermark=None), False)
    assert rec["requested"] is False and rec["applied"] is False and "invisible_watermark" in rec


def test_the_case_file_decides_watermarker_tf32_and_preprocessing(tmp_path, lite_assets):
    from conftest import write_case

    from carlos_audit.case.casefile import load_case

    case = load_case(write_case(tmp_path, lite_assets))
    assert case.base_model["add_watermarker"] is False and case.base_model["tf32"] is False
    assert case.embedder["preprocess"] == "pil" and case.embedder["dtype"] == "float32"
    bad = write_case(tmp_path, lite_assets, case_id="bad").read_text().replace(
        'model = "embedded:tiny-clip"', 'model = "embedded:tiny-clip"\npreprocess = "opencv"')
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(AuditError, match="embedder.preprocess"):
        load_case(tmp_path / "bad.toml")


def test_the_preset_states_what_the_reference_did_about_the_watermark():
    from carlos_audit.corpus.carlos import CARLOS_PRESET_NOTES

    assert "add_watermarker" in CARLOS_PRESET_NOTES["watermarker"] and "unknown" in CARLOS_PRESET_NOTES["watermarker"]
    assert "PIL" in CARLOS_PRESET_NOTES["embedder_preprocessing"]


@pytest.mark.parametrize("model", ["embedded:tiny-clip", "embedded:tiny-hf-clip"])
def test_the_embedder_identity_carries_a_non_default_backend(carlos_home, model):
    from carlos_audit.models.embedders import load_embedder

    emb = load_embedder(model, None)
    assert emb.identity == model and "pil" in emb.preprocess_description.lower()
    assert next(emb.model.parameters()).dtype == torch.float32
    if model == "embedded:tiny-hf-clip":
        tv = load_embedder(model, None, preprocess="torchvision")
        assert tv.identity == f"{model}@torchvision/float32"
    else:
        with pytest.raises(AuditError, match="open_clip preprocesses PIL"):
            load_embedder(model, None, preprocess="torchvision")
