"""The model families the tool audits, one entry each: what adding a family (SD 3.5, Qwen-Image)
takes is an entry here, its carried configs (``models/configs/<variant>/``), its loader branch
(``models/<family>.py``) and its LoRA key maps (``lora/<family>_keys.py``).

An entry names the diffusers pipeline class, the carried config folders (one per variant), the
embedded tiny model, the generation parameters the family adds to ``[protocol]`` with defaults
per variant, and the LoRA layouts its key maps know. ``variant_of_source`` tells the variant of a
base model from its source without loading weights (a folder's configs, a checkpoint's header,
a hub snapshot's configs); the case file takes its per-variant defaults from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


_UNET_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model*.safetensors", "vae/*.safetensors")


@dataclass(frozen=True)
class Family:
    name: str  # the architecture name LoRAs and pipelines are matched on ("sd15", "sdxl", "flux")
    pipeline: str  # diffusers pipeline class
    variants: dict  # variant -> {[protocol] key: default}; carried configs in models/configs/<variant>
    embedded: str | None = None  # the embedded tiny model of the family
    embedded_variant: str | None = None
    protocol_keys: tuple = ()  # [protocol] keys only this family takes
    lora_layouts: tuple = ()  # LoRA layouts its key maps know
    signature_keys: tuple = ()  # extra signature fields its profiles record
    hub_files: tuple = ()  # what `check` looks for in a hub snapshot of the family's pipeline
    supply_note: str = ""  # added to `check`'s "how to get it" line
    guidance: str = "cfg"  # how guidance_scale acts: "cfg" (classifier-free) or "embedded" (an input of the model)
    builder: str = ""  # "module:function" that builds the embedded tiny model once and returns its folder
    demo_loras: str = ""  # "module:function" that writes the family's demo LoRAs (`carlos-audit demo`)


FAMILIES = {
    "sd15": Family("sd15", "StableDiffusionPipeline", {"sd15": {}}, "embedded:tiny-sd", "sd15",
                   lora_layouts=("diffusers_peft", "diffusers_legacy", "kohya", "lycoris"), hub_files=_UNET_FILES,
                   builder="carlos_audit.models.tiny:ensure_tiny_sd"),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", {"sdxl": {}},
                   lora_layouts=("diffusers_peft", "diffusers_legacy", "kohya", "lycoris"), hub_files=_UNET_FILES),
    "flux": Family(
        "flux", "FluxPipeline",
        {
            # FLUX.1-dev: guidance-distilled (the guidance scale is an embedding input, no CFG), 28 steps
            "flux-dev": {"steps": 28, "guidance_scale": 3.5, "width": 1024, "height": 1024,
                         "max_sequence_length": 512, "scheduler": "FlowMatchEulerDiscreteScheduler"},
            # FLUX.1-schnell: timestep-distilled, no guidance input, 4 steps, T5 length 256
            "flux-schnell": {"steps": 4, "guidance_scale": 0.0, "width": 1024, "height": 1024,
                             "max_sequence_length": 256, "scheduler": "FlowMatchEulerDiscreteScheduler"},
        },
        "embedded:tiny-flux", "flux-dev",
        protocol_keys=("max_sequence_length",),
        lora_layouts=("diffusers_peft", "ai_toolkit", "kohya_flux", "xlabs"),
        signature_keys=("family", "guidance", "max_sequence_length"),
        hub_files=("model_index.json", "transformer/config.json", "transformer/*.safetensors", "vae/*.safetensors",
                   "text_encoder/*.safetensors", "text_encoder_2/*.safetensors", "tokenizer_2/*"),
        supply_note="FLUX.1-dev is gated on the Hub: accept its licence at huggingface.co/black-forest-labs/FLUX.1-dev "
                    "first (schnell is Apache-2.0); a single flux1-dev.safetensors also needs [base_model] config "
                    "(a diffusers FLUX.1 folder or hub id) for the VAE, CLIP-L and T5-XXL",
        guidance="embedded", builder="carlos_audit.models.flux:ensure_tiny_flux",
        demo_loras="carlos_audit.models.flux_demo:build_flux_demo_loras",
    ),
    # Z-Image (Tongyi-MAI): one single-stream DiT (30 layers, width 3840) with a Qwen3-4B text
    # encoder, for both variants; their configs differ only in the scheduler's shift.
    "zimage": Family(
        "zimage", "ZImagePipeline",
        {
            # Z-Image-Turbo: distilled to 8 function evaluations without CFG. The model card and the
            # diffusers docs run it with num_inference_steps=9 (8 DiT forwards) and guidance_scale=0.0
            # at 1024x1024; max_sequence_length 512 is ZImagePipeline's default (Qwen tokens); shift 3.0
            # is the checkpoint's scheduler_config.json (static, no dynamic shifting).
            "zimage-turbo": {"steps": 9, "guidance_scale": 0.0, "width": 1024, "height": 1024,
                             "max_sequence_length": 512, "scheduler": "FlowMatchEulerDiscreteScheduler"},
            # Z-Image (Base): undistilled, real classifier-free guidance with a negative prompt; its
            # model card runs 50 steps at guidance 4.0, 1024x1024; scheduler shift 6.0 (its
            # scheduler_config.json); the same pipeline default of 512 Qwen tokens.
            "zimage-base": {"steps": 50, "guidance_scale": 4.0, "width": 1024, "height": 1024,
                            "max_sequence_length": 512, "scheduler": "FlowMatchEulerDiscreteScheduler"},
        },
        "embedded:tiny-zimage", "zimage-turbo",
        protocol_keys=("max_sequence_length",),
        lora_layouts=("diffusers_peft", "peft", "ai_toolkit", "kohya_zimage", "diffsynth", "comfyui", "lycoris"),
        signature_keys=("family", "guidance", "max_sequence_length"),
        hub_files=("model_index.json", "transformer/config.json", "transformer/*.safetensors", "vae/*.safetensors",
                   "text_encoder/*.safetensors", "tokenizer/*"),
        supply_note="Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image on the Hub (Apache-2.0); the diffusers "
                    "folder holds the transformer, the Flux-type VAE and the Qwen3-4B text encoder",
        builder="carlos_audit.models.zimage:ensure_tiny_zimage",
        demo_loras="carlos_audit.models.zimage_demo:build_zimage_demo_loras",
    ),
}
FAMILY_VARIANTS = tuple(v for fam in FAMILIES.values() for v in fam.variants)
EMBEDDED_SOURCES = tuple(fam.embedded for fam in FAMILIES.values() if fam.embedded)

#: Signatures written before families were recorded are Stable Diffusion UNet profiles.
SIGNATURE_FAMILY_DEFAULT = "stable-diffusion"


def family_of_embedded(source: str) -> Family | None:
    """The family whose embedded tiny model ``source`` names (``embedded:tiny-zimage``), else None."""
    return next((fam for fam in FAMILIES.values() if fam.embedded == source), None)


def _function(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def ensure_embedded(source: str) -> Path | None:
    """The folder of an embedded family pipeline, built once per machine; None if ``source`` is
    not one of the families' embedded models."""
    fam = family_of_embedded(source)
    return _function(fam.builder)() if fam is not None and fam.builder else None


def build_demo_loras(fam: Family) -> dict:
    """The family's demo LoRAs (``{name: path}``), written once; {} for a family without them."""
    return _function(fam.demo_loras)() if fam.demo_loras else {}


def family_of_variant(variant: str | None) -> Family | None:
    for fam in FAMILIES.values():
        if variant in fam.variants:
            return fam
    return None


def variant_of_source(source: str, base_dir: Path | None = None) -> str | None:
    """The family variant ("flux-dev", "flux-schnell") of a base-model source, from configs and
    headers only; None for Stable Diffusion sources and anything not recognised (the loader
    decides those, as before)."""
    from carlos_audit.models.flux import single_file_flux_variant

    fam = family_of_embedded(source)
    if fam is not None:
        return fam.embedded_variant if fam.signature_keys else None  # Stable Diffusion: no variant fields
    p = Path(source).expanduser()
    if base_dir is not None and not p.is_absolute():
        p = base_dir / p
    try:
        if p.is_dir():
            return folder_variant(p)
        if p.is_file() and p.suffix.lower() == ".safetensors":
            return single_file_flux_variant(p)[0]
    except Exception:
        return None
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return _hub_variant(source)
    return None


def _hub_variant(repo_id: str) -> str | None:
    """A hub id's variant from its transformer config in the local cache (never the network)."""
    from carlos_audit.models.hub import cached_snapshot

    try:
        snap = cached_snapshot(repo_id, ("model_index.json",))
        return None if snap is None else folder_variant(snap)
    except Exception:
        return None


def folder_variant(folder: Path) -> str | None:
    """The family variant of a diffusers pipeline folder (FLUX.1 or Z-Image), from its configs."""
    from carlos_audit.models.flux import folder_flux_variant
    from carlos_audit.models.zimage import folder_zimage_variant

    return folder_flux_variant(folder) or folder_zimage_variant(folder)


def protocol_defaults(variant: str | None) -> dict:
    fam = family_of_variant(variant)
    return dict(fam.variants[variant]) if fam else {}


def pipeline_family(pipe) -> tuple[str, str | None]:
    """(architecture, variant) of a loaded pipeline: "flux" with "flux-dev"/"flux-schnell" from
    the transformer's guidance embedder; "zimage" with "zimage-turbo"/"zimage-base" from the
    scheduler's shift (None for another shift); "sdxl"/"sd15"/"other" for UNet pipelines."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux", "flux-dev" if pipe.transformer.config.guidance_embeds else "flux-schnell"
    if name.startswith("ZImage"):
        from carlos_audit.models.zimage import SHIFT_VARIANTS

        return "zimage", SHIFT_VARIANTS.get(float(pipe.scheduler.config.get("shift", 1.0)))
    if "XL" in name:
        return "sdxl", "sdxl"
    cad = getattr(getattr(pipe, "unet", None), "config", None)
    if cad is not None and getattr(cad, "cross_attention_dim", None) == 768:
        return "sd15", "sd15"
    return "other", None


def signature_extra(variant: str | None, protocol: dict) -> dict:
    """The family's extra signature fields for a case's [protocol]; empty for Stable Diffusion."""
    fam = family_of_variant(variant)
    if fam is None:
        return {}
    # a variant whose default guidance is 0 has no guidance (FLUX.1-schnell, Z-Image-Turbo); otherwise
    # the family's kind: an embedded guidance input (FLUX.1-dev) or classifier-free guidance (Z-Image Base)
    values = {**protocol, "family": variant, "guidance": fam.guidance if fam.variants[variant].get("guidance_scale") else "none"}
    return {k: values.get(k) for k in fam.signature_keys}


def hub_files(variant: str | None) -> tuple:
    """The files ``check`` needs in a hub snapshot of a base model of ``variant`` (SD when None)."""
    return (family_of_variant(variant) or FAMILIES["sdxl"]).hub_files
