"""What "same numbers" means, defined once.

* The **signature** of a profile: the fields two CARLoS profiles must share to be comparable
  (``case_signature`` builds it for a case; the corpus, ``add_case`` and the comparison check
  it), the named upstream presets, and the compatibility check a corpus and a case go through.
* The **reproducibility key** of a batch of images: everything that fixes their bytes (base
  model, generation parameters, batch layout, prompts sent, seeds, and the environment that
  changes bits: package versions, python, machine, platform, device, dtype, torch thread count,
  CUDA, GPU, fast path). The base-image cache, the corpus build's shared base arm, ``verify``'s
  "same platform" decision and the kit's "can change numbers" flags (kit/envlock.py) all use it.
"""

from __future__ import annotations

import json

from carlos_audit.case.protocol import CARLOS_INDEXING_SHA256, prompts_sha256
from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_json

#: The fields two profiles must share to be comparable (same order as the manifest's ``signature``).
SIGNATURE_FIELDS = (
    "base_model", "base_model_sha256", "embedder", "embedder_sha256", "feature", "prompts_sha256",
    "seeds", "lora_scale", "trigger_policy", "steps", "guidance_scale", "width", "height",
    "scheduler", "seed_mode",
)

#: What is compared: CLIP image features before normalisation.
FEATURE = "raw_image_features"


#: The named upstream protocols a corpus can be imported under (``corpus import --preset``).
PRESETS = ("carlos-sdxl-vitb32",)


def preset_signature(preset: str) -> dict:
    """The signature of a named upstream protocol (``carlos-sdxl-vitb32``): what the reference
    code of the official ``carlos`` 0.0.3 wheel does (carlos/index.py, carlos/config.py): SDXL base
    1.0 in fp16, 25 steps, the pipeline's default guidance (5.0), scheduler (Euler) and size
    (1024), LoRA scale 1.0 with ", <trigger>" appended on the LoRA side only, CLIPModel
    get_image_features on CLIPProcessor output, and ``torch.manual_seed(s)`` for each batch of 4
    images of a prompt, s = 42, 46, 50, 54 (images 42..57 here)."""
    if preset not in PRESETS:
        raise AuditError(f"unknown corpus preset {preset!r} (known: {', '.join(PRESETS)})")
    return {
        "base_model": "hf:stabilityai/stable-diffusion-xl-base-1.0",
        "base_model_sha256": None,
        "embedder": "hf-transformers:openai/clip-vit-base-patch32",
        "embedder_sha256": None,
        "feature": FEATURE,
        "prompts_sha256": CARLOS_INDEXING_SHA256,
        "seeds": list(range(42, 58)),
        "lora_scale": 1.0,
        "trigger_policy": "lora_only",
        "steps": 25,
        "guidance_scale": 5.0,
        "width": 1024,
        "height": 1024,
        "scheduler": "EulerDiscreteScheduler",
        "seed_mode": seed_mode_signature("carlos-batch", 4),
    }


def seed_mode_signature(seed_mode: str, batch_size: int) -> str:
    """The signature's ``seed_mode``: "per-image", or "carlos-batch/<n>" (one generator per batch
    of n images: the batch size is then part of the noise)."""
    return seed_mode if seed_mode == "per-image" else f"{seed_mode}/{batch_size}"


def empty_signature() -> dict:
    return {k: None for k in SIGNATURE_FIELDS}


def case_signature(case, prompts, *, base_model: str, base_model_sha256: str | None, embedder: str,
                   embedder_sha256: str | None, scheduler: str) -> dict:
    """The signature of ``case`` run with ``prompts`` on the loaded models it names (identities and
    hashes as loaded, the scheduler class actually used). The one place a signature is built."""
    pc = case.protocol
    values = {
        "base_model": base_model, "base_model_sha256": base_model_sha256,
        "embedder": embedder, "embedder_sha256": embedder_sha256, "feature": FEATURE,
        "prompts_sha256": prompts_sha256(prompts), "seeds": list(pc.seeds),
        "lora_scale": case.lora.scale, "trigger_policy": case.lora.trigger_policy,
        "steps": pc.steps, "guidance_scale": pc.guidance_scale, "width": pc.width, "height": pc.height,
        "scheduler": scheduler, "seed_mode": seed_mode_signature(pc.seed_mode, pc.batch_size),
    }
    from carlos_audit.models.families import signature_extra

    # a model family's own fields (FLUX.1: family, guidance, max_sequence_length) follow the shared ones; a LoRA
    # applied by ComfyUI's convention is another measurement: named, so it never matches a reference profile
    convention = {} if case.lora.convention == "reference" else {"lora_convention": case.lora.convention}
    return {**{f: values[f] for f in SIGNATURE_FIELDS}, **signature_extra(case.base_model.family, pc.to_dict()),
            **convention}


# --------------------------------------------------------------------------- reproducibility

#: Packages whose version can change the bytes of an image or an embedding (PNG encoding
#: included). run/environment.capture records them; the kit's environment lock flags them.
BIT_PACKAGES = ("carlos-audit", "torch", "torchvision", "diffusers", "transformers", "peft", "open_clip_torch",
                "safetensors", "numpy", "pillow", "scipy", "accelerate", "tokenizers")

#: Fields of an environment record (run/environment.capture) that can change bits on the CPU.
BIT_ENVIRONMENT_FIELDS = ("packages", "python", "machine", "platform", "device", "dtype", "torch_threads", "cuda",
                          "gpu", "fastpath")

#: ... and on a CUDA device (run/devices.cuda_details): the GPU model, driver, CUDA / cuDNN /
#: cuBLAS, dtype, TF32 and determinism flags; not the CPU's thread count, platform or python.
#: ``device`` is the class ("cuda"), not the index: cuda:3 gives the bits of cuda:0 on a like GPU.
CUDA_BIT_ENVIRONMENT_FIELDS = ("packages", "device", "dtype", "gpu", "gpu_capability", "driver", "cuda", "cudnn",
                               "cublas", "tf32", "determinism_flags", "fastpath")


def bit_fields(env: dict) -> tuple:
    """The fields of ``env`` that can change bits, by its device class."""
    return CUDA_BIT_ENVIRONMENT_FIELDS if str(env.get("device") or "").startswith("cuda") else BIT_ENVIRONMENT_FIELDS


def bits_environment(env: dict) -> dict:
    """The part of an environment record (manifest ``environment``) that can change the numbers:
    on the CPU, versions of BIT_PACKAGES, python, machine, platform, device, dtype, torch thread
    count, CUDA version, GPU, and the fast path settings when a fast path is active; on CUDA, the
    CUDA_BIT_ENVIRONMENT_FIELDS. Missing fields read as None (older manifests)."""
    packages = env.get("packages") or {}
    fastpath = env.get("fastpath")
    values = dict(env, packages={p: packages.get(p) for p in BIT_PACKAGES},
                  fastpath=fastpath if fastpath and fastpath.get("active") else None)
    fields = bit_fields(env)
    if fields is CUDA_BIT_ENVIRONMENT_FIELDS:
        values["device"] = "cuda"
    return {f: values.get(f) for f in fields}


def environment_differences(env_a: dict, env_b: dict) -> list[str]:
    """Fields (``packages.torch``, ``torch_threads``...) where two environment records differ in a
    way that can change bits; empty: the same platform, from which identical bytes are expected."""
    a, b = bits_environment(env_a), bits_environment(env_b)
    out = [f"packages.{p}" for p in BIT_PACKAGES if a["packages"][p] != b["packages"][p]]
    if bit_fields(env_a) is not bit_fields(env_b):  # another device class: nothing else is comparable
        return out + ["device"]
    return out + [f for f in bit_fields(env_a) if f != "packages" and a[f] != b[f]]


#: the generation parameters a reproducibility key holds (``max_sequence_length`` only where set: FLUX.1)
KEY_PARAMS = ("steps", "guidance_scale", "width", "height", "scheduler", "negative_prompt", "seed_mode",
              "max_sequence_length")


def key_params(protocol: dict, scheduler: str) -> dict:
    """The ``params`` of a reproducibility key, from a case's ``[protocol]`` (or a run's generation
    parameters) and the scheduler class: the one list for the run's base-image cache and the corpus
    build's shared base arm. ``max_sequence_length`` is left out when unset, so the Stable
    Diffusion keys are those of earlier runs and builds."""
    out = {k: protocol.get(k) for k in KEY_PARAMS[:-2]} | {"scheduler": scheduler,
                                                           "seed_mode": protocol.get("seed_mode") or "per-image"}
    if protocol.get("max_sequence_length") is not None:
        out["max_sequence_length"] = protocol["max_sequence_length"]
    return out


def reproducibility_key(*, base_model, params: dict, batch_size: int, prompts_sent: list[str], seeds: list[int],
                        environment: dict, extra: dict | None = None) -> tuple[str, dict]:
    """The key of a batch (or an arm) of images: sha256 of everything that fixes their bytes, and
    the description hashed. ``base_model`` identifies the weights (a sha256, or the case's source
    and expected hash when nothing is loaded yet); ``params`` are the generation parameters
    (``key_params``); ``environment`` an environment record (only its ``bits_environment`` part counts); ``extra``
    whatever else the caller's files depend on (the corpus build's shared arm: the embedder)."""
    desc = {"base_model": base_model, "params": dict(params), "batch_size": int(batch_size),
            "batch": [[p, int(sd)] for p, sd in zip(prompts_sent, seeds, strict=True)],
            "environment": bits_environment(environment)}
    if extra:
        desc["extra"] = extra
    return sha256_json(desc), desc


# --------------------------------------------------------------------------- signatures


def _norm_value(v):
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return [_norm_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm_value(x) for k, x in v.items()}
    return v


def _signature_fields(a: dict, b: dict) -> list[str]:
    extra = sorted((set(a) & set(b)) - set(SIGNATURE_FIELDS))
    return list(SIGNATURE_FIELDS) + extra


def check_compatible(corpus_signature: dict | None, case_signature: dict | None) -> list[str]:
    """Names of the signature fields that both sides record and that differ. ``family`` is always
    compared: a signature without it is a Stable Diffusion profile, so a FLUX.1 case never matches
    an SDXL corpus even where the corpus left its base model unrecorded."""
    from carlos_audit.models.families import SIGNATURE_FAMILY_DEFAULT

    a, b = corpus_signature or {}, case_signature or {}
    if a and b and (a.get("family") or SIGNATURE_FAMILY_DEFAULT) != (b.get("family") or SIGNATURE_FAMILY_DEFAULT):
        a, b = {**a, "family": a.get("family") or SIGNATURE_FAMILY_DEFAULT}, {**b, "family": b.get("family") or SIGNATURE_FAMILY_DEFAULT}
    out = []
    for f in _signature_fields(a, b):
        va, vb = a.get(f), b.get(f)
        if va is None or vb is None:
            continue
        if _norm_value(va) != _norm_value(vb):
            out.append(f)
    return out


def unverifiable_fields(corpus_signature: dict | None, case_signature: dict | None) -> list[str]:
    """Names of the signature fields missing (or null) on at least one side."""
    a, b = corpus_signature or {}, case_signature or {}
    return [f for f in _signature_fields(a, b) if a.get(f) is None or b.get(f) is None]


def _short(v, limit: int = 48) -> str:
    s = json.dumps(v, ensure_ascii=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def require_compatible(corpus_signature: dict | None, case_signature: dict | None,
                       allow_incompatible: bool = False) -> dict:
    """Refuse (AuditError) when the signatures differ, unless ``allow_incompatible``.

    Returns ``{"differing": [...], "unverifiable": [...]}`` for the caller to record.
    """
    differing = check_compatible(corpus_signature, case_signature)
    if differing and not allow_incompatible:
        a, b = corpus_signature or {}, case_signature or {}
        detail = ", ".join(f"{f} (corpus {_short(a.get(f))}, case {_short(b.get(f))})" for f in differing)
        raise AuditError(f"the case and the corpus were profiled differently: {detail}; "
                         f"pass --allow-incompatible to compare anyway")
    return {"differing": differing, "unverifiable": unverifiable_fields(corpus_signature, case_signature)}


