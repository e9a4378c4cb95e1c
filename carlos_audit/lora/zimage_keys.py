"""Z-Image LoRA key maps: the tensor names each trainer writes for the Z-Image transformer, the
layout of a file, and the diffusers modules (with row ranges) each module of the file lands on.

Module names (diffusers ``ZImageTransformer2DModel``): ``layers.<i>``, ``noise_refiner.<i>``,
``context_refiner.<i>`` blocks with ``attention.to_q|to_k|to_v|to_out.0``,
``feed_forward.w1|w2|w3`` and ``adaLN_modulation.0`` (not in the context refiner), plus
``t_embedder.mlp.0|2``, ``cap_embedder.1``, ``all_x_embedder.2-1`` and
``all_final_layer.2-1.linear|adaLN_modulation.1``. The original (ComfyUI) checkpoint names differ
in four places (diffusers ``single_file_utils.convert_z_image_transformer_checkpoint_to_diffusers``):
a fused ``attention.qkv`` (q, k, v rows in that order, equal thirds), ``attention.out``,
``x_embedder`` and ``final_layer.``.

Layouts (``layout``):

* ``ai_toolkit``: ostris' ai-toolkit saves peft factors with ``transformer.`` renamed to
  ``diffusion_model.`` (``diffusion_model.layers.0.attention.to_q.lora_A.weight``);
* ``kohya_zimage``: kohya/musubi-tuner ``lora_unet_<flattened diffusers name>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (musubi ``networks/lora_zimage.py``);
* ``comfyui``: the original names, ``diffusion_model.<native>`` or, as musubi-tuner's
  ``convert_z_image_lora_to_comfy.py`` writes, ``lora_unet_<flattened native>`` with a fused
  ``attention_qkv`` (block-sparse up factor, alpha x 3);
* ``diffusers_peft``: ``transformer.<module>.lora_A/B.weight`` (``save_lora_weights``);
* ``peft``: a peft model's state dict, ``base_model.model.<module>.lora_A/B.weight``;
* ``diffsynth``: DiffSynth-Studio's peft names without prefix, with peft's adapter level
  (``layers.0.attention.to_q.lora_A.default.weight``);
* ``lycoris``: SimpleTuner / LyCORIS ``lycoris_<flattened>`` with LoRA, LoKr (``lokr_w1/w2``),
  LoHa (``hada_*``) tensors; LyCORIS tensors under the other prefixes are read the same way.
"""

from __future__ import annotations

import re

LAYOUTS = ("ai_toolkit", "kohya_zimage", "comfyui", "diffusers_peft", "peft", "diffsynth", "lycoris")

_BLOCK_SUB = r"attention\.(?:to_q|to_k|to_v|to_out\.0|qkv|out)|feed_forward\.w[123]|adaLN_modulation\.0"
_MODULE = (rf"(?:layers|noise_refiner|context_refiner|siglip_refiner)\.\d+\.(?:{_BLOCK_SUB})|t_embedder\.mlp\.[02]"
           r"|cap_embedder\.1|siglip_embedder\.1|all_x_embedder\.2-1|all_final_layer\.2-1\.(?:linear|adaLN_modulation\.1)"
           r"|x_embedder|final_layer\.(?:linear|adaLN_modulation\.1)")
_DOTTED = re.compile(rf"^(diffusion_model\.|model\.diffusion_model\.|transformer\.|base_model\.model\.)?({_MODULE})\.(.+)$")
_FLAT_PREFIX = re.compile(r"^(lora_unet_|lycoris_)([A-Za-z0-9_\-]+)\.(.+)$")

#: flattened name -> dotted name, for every module name the pattern allows (block index apart)
_FLAT_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner|siglip_refiner)_(\d+)_(.+)$")
_FLAT_SUBS = {s.replace(".", "_"): s for s in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                                                "attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                                                "feed_forward.w3", "adaLN_modulation.0")}
_FLAT_GLOBAL = {s.replace(".", "_"): s for s in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1", "siglip_embedder.1",
                                                  "all_x_embedder.2-1", "all_final_layer.2-1.linear",
                                                  "all_final_layer.2-1.adaLN_modulation.1", "x_embedder",
                                                  "final_layer.linear", "final_layer.adaLN_modulation.1")}
_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
          "alpha": "alpha", "dora_scale": "dora_scale", "lora_magnitude_vector": "dora_scale",
          "lora_magnitude_vector.weight": "dora_scale", "diff": "diff", "diff_b": "diff_b",
          **{s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                            "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
FUSED_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")


def diffusers_name(module: str) -> str:
    """A Z-Image module name (diffusers or original) as diffusers names it; a fused
    ``attention.qkv`` is kept (it lands on three modules, ``targets``)."""
    if module.endswith(".attention.out"):
        return module[: -len("out")] + "to_out.0"
    if module == "x_embedder":
        return "all_x_embedder.2-1"
    if module.startswith("final_layer."):
        return "all_final_layer.2-1." + module[len("final_layer."):]
    return module


def _unflatten(flat: str) -> str | None:
    m = _FLAT_BLOCK.match(flat)
    if m:
        sub = _FLAT_SUBS.get(m[3])
        return None if sub is None else f"{m[1]}.{m[2]}.{sub}"
    return _FLAT_GLOBAL.get(flat)


def parse_zimage_key(key: str) -> tuple[str, str, str] | None:
    """``(style, "transformer.<diffusers module>", role)`` for a Z-Image tensor name in any layout
    of the module doc, else None. Styles: ``kohya`` (flattened names), ``peft`` (dotted names);
    peft's adapter level (``.default.``) is dropped."""
    m = _FLAT_PREFIX.match(key)
    if m:
        dotted = _unflatten(m[2])
        if dotted is None:
            return None
        return "kohya", f"transformer.{diffusers_name(dotted)}", _ROLES.get(m[3], f"other:{m[3]}")
    m = _DOTTED.match(key)
    if m is None:
        return None
    suffix = re.sub(r"^(lora_[AB])\.default\.", r"\1.", m[3]).replace(".default", "") if ".default" in m[3] else m[3]
    role = _ROLES.get(suffix)
    if role is None:
        return None
    return "peft", f"transformer.{diffusers_name(m[2])}", role


_ZIMAGE_BLOCK = re.compile(r"^transformer\.(layers|noise_refiner|context_refiner)\.(\d+)\.(attention|feed_forward|adaLN_modulation)")


def is_zimage(modules: dict[str, dict]) -> str | None:
    """The rule that makes a LoRA's modules Z-Image (None if they are not): blocks named
    ``layers`` / ``noise_refiner`` / ``context_refiner`` with ``attention`` / ``feed_forward``
    modules (Z-Image's single-stream DiT; no SD UNet or FLUX.1 transformer has them)."""
    if any(_ZIMAGE_BLOCK.match(n) for n in modules):
        return "Z-Image single-stream blocks (layers / noise_refiner / context_refiner with attention, feed_forward)"
    return None


def width(modules: dict[str, dict]) -> int | None:
    """The transformer width a Z-Image LoRA was trained on: the in-features of its attention
    projections (3840 for Z-Image Turbo and Base)."""
    dims = {m.get("in_features") for n, m in modules.items() if re.search(r"\.attention\.(to_q|to_k|to_v|qkv)$", n)}
    dims.discard(None)
    return dims.pop() if len(dims) == 1 else None


def blocks_touched(modules) -> dict:
    """Which main layers and refiner blocks a Z-Image LoRA touches, and its other modules."""
    out = {"layers": set(), "noise_refiner": set(), "context_refiner": set(), "other": set()}
    for name in modules:
        m = _ZIMAGE_BLOCK.match(name)
        if m:
            out[m[1]].add(int(m[2]))
        else:
            out["other"].add(name)
    return {k: sorted(v) for k, v in out.items()} | {"width": width(modules)}


def layout(header: dict) -> str | None:
    """The Z-Image layout of a safetensors header (see the module doc), None if none applies."""
    keys = [k for k in header if k != "__metadata__"]
    native = any(re.search(r"attention[._](qkv|out)[.]", k) or re.match(r"^(diffusion_model\.|lora_unet_)(x_embedder|final_layer)", k)
                 for k in keys)
    if any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if any(k.startswith("lora_unet_") for k in keys):
        return "comfyui" if native else "kohya_zimage"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui" if native else "ai_toolkit"
    if any(".default." in k for k in keys):
        return "diffsynth"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers_peft"
    return None


def targets(module: str, out_features: int | None) -> list[tuple[str, int, int]]:
    """The diffusers modules ``(name, first row, end row)`` a module of the file lands on, rows of
    its weight change in order: a fused ``attention.qkv`` splits in equal thirds over to_q, to_k,
    to_v; any other module maps onto itself."""
    out = out_features or 0
    if module.endswith(".attention.qkv"):
        block = module[: -len("qkv")]
        third = out // 3
        return [(block + name.split(".", 1)[1], i * third, (i + 1) * third) for i, name in enumerate(FUSED_QKV)]
    return [(module, 0, out)]


def transformer_linears(config: dict) -> dict[str, tuple[int, int]]:
    """``{"transformer.<module>": (in_features, out_features)}`` of every linear layer of a Z-Image
    transformer with ``config``, built on the meta device (no weights)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {f"transformer.{n}": (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


#: metadata keys trainers write the base model into: kohya/musubi (``ss_dit``: the DiT file
#: trained on; ``modelspec.*``), ai-toolkit (``ss_base_model_version`` is "zimage" for both
#: variants; its ``config`` / ``training_info`` JSON names the model path), others
_VARIANT_KEYS = ("ss_dit", "ss_base_model_version", "modelspec.architecture", "modelspec.title", "ss_sd_model_name",
                 "base_model", "config", "training_info", "modelspec.description")
_TURBO = re.compile(r"z[-_ ]?image[-_ ]?(?:de[-_ ]?)?turbo", re.IGNORECASE)
_BASE = re.compile(r"z[-_ ]?image[-_ ]?base|tongyi-mai/z-image(?![-\w])", re.IGNORECASE)


def declared_variant(metadata: dict) -> dict:
    """The Z-Image variant a LoRA's metadata names (SELF-REPORTED): ``{"declared_variant":
    "zimage-turbo" | "zimage-base", "declared_by": key}``, or {} when it names neither. Turbo
    wins within one value (ostris' "de-turbo" training adapter is for Turbo)."""
    if not isinstance(metadata, dict):
        return {}
    for key in (*_VARIANT_KEYS, *sorted(k for k in metadata if k not in _VARIANT_KEYS)):
        value = metadata.get(key)
        if not isinstance(value, str):
            continue
        if _TURBO.search(value):
            return {"declared_variant": "zimage-turbo", "declared_by": key}
        if _BASE.search(value):
            return {"declared_variant": "zimage-base", "declared_by": key}
    return {}
