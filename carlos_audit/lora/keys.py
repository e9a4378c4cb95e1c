"""Tensor names of LoRA files: which style (diffusers/peft, legacy, kohya, LyCORIS), which module,
which role; kohya names (SD 1.5 and SDXL/LDM layouts) mapped to diffusers module names."""

from __future__ import annotations

import functools
import re
from types import MappingProxyType

from carlos_audit.errors import AuditError
from carlos_audit.lora.flux_keys import parse_flux_key
from carlos_audit.lora.zimage_keys import parse_zimage_key

# --------------------------------------------------------------------------------------------
# Key parsing: tensor name -> (style, canonical module name, role)
# --------------------------------------------------------------------------------------------

# kohya name prefixes -> diffusers component
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_transformer_", "transformer"),
)

# kohya / LyCORIS suffix (after the module name) -> role
_KOHYA_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff": "diff",
    "diff_b": "diff_b",
    **{s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    # LyCORIS (IA)^3, diag-OFT / BOFT, GLoRA
    **{s: s for s in ("weight", "on_input", "oft_blocks", "rescale")},
    **{f"{s}.weight": s for s in ("a1", "a2", "b1", "b2", "bm")},
}

# diffusers / peft suffixes -> role
_PEFT_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
}
_LEGACY_ROLES = {
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
}
# attention-processor style: "...attn1.processor.to_q_lora.down.weight"
_LEGACY_PROCESSOR = re.compile(r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>\w+)_lora\.(?P<ud>down|up)\.weight$")

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
_UNET_ROOTS = (
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "encoder_hid_proj",
)


def _diffusers_canonical(module: str) -> str:
    """Add the component prefix a bare diffusers module path lacks (``down_blocks...`` -> unet)."""
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    first = module.split(".", 1)[0]
    if first in COMPONENTS:
        return module
    if first in _UNET_ROOTS:
        return "unet." + module
    return module


def parse_key(key: str) -> tuple[str, str, str] | None:
    """``(style, canonical module name, role)`` for a LoRA tensor name, or None if unrecognised.

    style is ``"kohya"``, ``"peft"``, ``"legacy"`` or ``"xlabs"`` (FLUX.1 names: ``flux_keys``; Z-Image
    names in every trainer's layout: ``zimage_keys``).
    """
    family_key = parse_flux_key(key) or parse_zimage_key(key)  # FLUX.1 and Z-Image names: their key maps
    if family_key is not None:
        return family_key
    for prefix, _ in _KOHYA_PREFIXES:
        if key.startswith(prefix) and "." in key:
            module, suffix = key.split(".", 1)
            role = _KOHYA_ROLES.get(suffix, f"other:{suffix}")
            return "kohya", kohya_to_diffusers_name(module), role
    for suffix, role in _PEFT_ROLES.items():
        if key.endswith("." + suffix):
            return "peft", _diffusers_canonical(key[: -len(suffix) - 1]), role
    for suffix, role in _LEGACY_ROLES.items():
        if key.endswith("." + suffix):
            return "legacy", _diffusers_canonical(key[: -len(suffix) - 1]), role
    m = _LEGACY_PROCESSOR.match(key)
    if m:
        proj = m["proj"] + (".0" if m["proj"] == "to_out" else "")
        return "legacy", _diffusers_canonical(f"{m['module']}.{proj}"), m["ud"]
    if key.endswith(".alpha"):  # alpha stored next to diffusers-style factors
        return "alpha_only", _diffusers_canonical(key[: -len(".alpha")]), "alpha"
    return None


# --------------------------------------------------------------------------------------------
# kohya module names -> diffusers dotted paths
# --------------------------------------------------------------------------------------------

# Names that contain underscores themselves; everything else splits at every underscore.
_COMPOUND_TOKENS = sorted(
    (
        tuple(t.split("_"))
        for t in (
            # diffusers UNet
            "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "time_emb_proj",
            "conv_shortcut", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
            "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "time_embedding",
            "linear_1", "linear_2", "conv_in", "conv_out", "conv_norm_out", "add_embedding",
            "encoder_hid_proj", "single_transformer_blocks", "context_embedder", "x_embedder",
            # original (LDM / SGM) UNet, used by kohya for SDXL
            "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers",
            "emb_layers", "skip_connection", "time_embed", "label_emb",
            # CLIP text encoders
            "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
            "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
            "position_embedding", "text_projection",
        )
    ),
    key=len,
    reverse=True,
)

@functools.cache
def _compounds_by_first() -> MappingProxyType:
    """The compound names by their first token, longest first (a memo of a constant: built once)."""
    by_first: dict[str, list[tuple[str, ...]]] = {}
    for compound in _COMPOUND_TOKENS:
        by_first.setdefault(compound[0], []).append(compound)
    return MappingProxyType({first: tuple(compounds) for first, compounds in by_first.items()})


def _split_tokens(body: str) -> list[str]:
    """Split an underscore-joined path into tokens, keeping known compound names whole."""
    parts = body.split("_")
    compounds_by_first = _compounds_by_first()
    tokens, i = [], 0
    while i < len(parts):
        for compound in compounds_by_first.get(parts[i], ()):
            if tuple(parts[i : i + len(compound)]) == compound:
                tokens.append("_".join(compound))
                i += len(compound)
                break
        else:
            tokens.append(parts[i])
            i += 1
    return tokens


_LDM_RESNET = {
    ("in_layers", "0"): "norm1",
    ("in_layers", "2"): "conv1",
    ("emb_layers", "1"): "time_emb_proj",
    ("out_layers", "0"): "norm2",
    ("out_layers", "3"): "conv2",
}


def _ldm_resnet(rest: list[str]) -> list[str]:
    if rest and rest[0] == "skip_connection":
        return ["conv_shortcut"] + rest[1:]
    if len(rest) >= 2 and (rest[0], rest[1]) in _LDM_RESNET:
        return [_LDM_RESNET[(rest[0], rest[1])]] + rest[2:]
    return rest


def _ldm_unet_to_diffusers(tokens: list[str]) -> list[str]:
    """Map original-UNet (LDM/SGM) tokens to diffusers tokens; SD 1.x / 2.x / SDXL layout.

    Assumes ``layers_per_block = 2`` (true for SD 1.x, 2.x and SDXL): input block ``i >= 1`` is
    down block ``(i-1)//3``, slot ``(i-1)%3`` (slot 2 = downsampler); output block ``i`` is up
    block ``i//3``, slot ``i%3``. Within a block, sub-index 0 is the resnet, then the
    attention (if any), then the up/downsampler. Tokens that do not fit are returned unchanged.
    """
    head = tokens[0]
    try:
        if head == "input_blocks":
            i, j, rest = int(tokens[1]), int(tokens[2]), tokens[3:]
            if i == 0:
                return ["conv_in"] + rest
            block, slot = (i - 1) // 3, (i - 1) % 3
            if slot == 2:
                return ["down_blocks", str(block), "downsamplers", "0", "conv"]
            if j == 0:
                return ["down_blocks", str(block), "resnets", str(slot)] + _ldm_resnet(rest)
            return ["down_blocks", str(block), "attentions", str(slot)] + rest
        if head == "middle_block":
            j, rest = int(tokens[1]), tokens[2:]
            if j == 1:
                return ["mid_block", "attentions", "0"] + rest
            return ["mid_block", "resnets", str(j // 2)] + _ldm_resnet(rest)
        if head == "output_blocks":
            i, j, rest = int(tokens[1]), int(tokens[2]), tokens[3:]
            block, slot = i // 3, i % 3
            if j == 0:
                return ["up_blocks", str(block), "resnets", str(slot)] + _ldm_resnet(rest)
            if rest and rest[0] == "conv":
                return ["up_blocks", str(block), "upsamplers", "0", "conv"]
            return ["up_blocks", str(block), "attentions", str(slot)] + rest
        if head == "time_embed":
            return ["time_embedding", {"0": "linear_1", "2": "linear_2"}[tokens[1]]]
        if head == "label_emb":
            return ["add_embedding", {"0": "linear_1", "2": "linear_2"}[tokens[2]]]
        if head == "out" and len(tokens) == 2:
            return [{"0": "conv_norm_out", "2": "conv_out"}[tokens[1]]]
    except (IndexError, KeyError, ValueError):
        pass
    return tokens


def _kohya_split_prefix(name: str) -> tuple[str | None, str]:
    for prefix, component in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None, name


def kohya_to_diffusers_name(name: str, known_module_names=None) -> str:
    """Map a kohya module name to its diffusers dotted path.

    ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` ->
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. The prefix
    (``lora_unet_``, ``lora_te_``/``lora_te1_`` -> ``text_encoder``, ``lora_te2_`` ->
    ``text_encoder_2``) becomes the component; a name without prefix gets none.

    Underscores are ambiguous (``to_q`` vs ``to.q``), so:

    * With ``known_module_names`` (the real module names of a model, e.g. from
      ``unet.named_modules()``, with or without the component prefix), the mapping is exact: the
      name must equal a known name with dots replaced by underscores. A name that matches no
      known module raises AuditError.
    * Without it, a best-effort rule splits at underscores except inside known compound
      names (``down_blocks``, ``transformer_blocks``, ``to_q``, ``proj_in``, ``time_emb_proj``,
      ``self_attn``, ``q_proj``, ...), which covers the standard SD UNet and CLIP names. Original
      (LDM) UNet names as kohya writes them for SDXL (``input_blocks_4_1_...``) are then mapped
      to diffusers blocks (see ``_ldm_unet_to_diffusers``).
    """
    component, body = _kohya_split_prefix(name)
    tokens = _split_tokens(body)
    if component in ("unet", None) and tokens and tokens[0] in (
        "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"
    ):
        tokens = _ldm_unet_to_diffusers(tokens)
    best_effort = ".".join(tokens)

    if known_module_names is not None:
        flat_targets = {body, best_effort.replace(".", "_")}
        for known in known_module_names:
            bare = known
            if component and known.startswith(component + "."):
                bare = known[len(component) + 1:]
            if bare.replace(".", "_") in flat_targets:
                return f"{component}.{bare}" if component else bare
        raise AuditError(f"kohya module {name!r} matches no module of the given model")

    return f"{component}.{best_effort}" if component else best_effort

