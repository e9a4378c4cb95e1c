"""FLUX.1 LoRA files in the layouts trainers write, generated from a FluxTransformer2DModel's own
modules (the tiny one, or the full-size one on the meta device) so names and shapes are right
at any size.

The trainers are not installable here; names and shapes follow their code and diffusers'
conversion code (diffusers/loaders/lora_conversion_utils.py), which is what loads them:

* kohya sd-scripts networks/lora_flux.py: ``lora_unet_double_blocks_<i>_<img|txt>_<attn_qkv|
  attn_proj|mlp_0|mlp_2|mod_lin>`` and ``lora_unet_single_blocks_<i>_<linear1|linear2|
  modulation_lin>`` on Black Forest Labs modules (qkv: Linear(3072, 9216); linear1:
  Linear(3072, 21504); linear2: Linear(15360, 3072)), ``.lora_down.weight`` (r, in),
  ``.lora_up.weight`` (out, r), ``.alpha`` (scalar); ``lora_te1_text_model_encoder_layers_<i>_
  <self_attn_q_proj|...|mlp_fc1|mlp_fc2>`` for CLIP-L (read by ``_convert_kohya_flux_lora_to_
  diffusers`` / ``_convert_sd_scripts_to_ai_toolkit``);
* XLabs-AI x-flux (src/flux/modules/layers.py DoubleStreamBlockLoraProcessor /
  SingleStreamBlockLoraProcessor): ``double_blocks.<i>.processor.qkv_lora1`` (dim -> 3 dim),
  ``proj_lora1`` (dim -> dim), ``qkv_lora2``, ``proj_lora2``; ``single_blocks.<i>.processor.
  qkv_lora`` (dim -> 3 dim), ``proj_lora`` (dim + mlp -> dim); ``.down.weight`` / ``.up.weight``,
  no alpha (read by ``_convert_xlabs_flux_lora_to_diffusers``);
* diffusers/peft (examples/dreambooth/train_dreambooth_lora_flux.py default ``lora_layers``:
  attn.to_k/q/v/to_out.0, attn.add_k/q/v_proj, attn.to_add_out, ff.net.0.proj, ff.net.2,
  ff_context.net.0.proj, ff_context.net.2): ``transformer.<module>.lora_A.weight`` / ``lora_B``;
* ostris ai-toolkit (toolkit/lora_special.py with the Flux transformer blocks as targets: every
  Linear of FluxTransformerBlock / FluxSingleTransformerBlock, norm linears and proj_mlp
  included), saved in diffusers names with its ``software`` metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from carlos_audit.lora.flux_keys import DOUBLE, SINGLE

PEFT_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


def linears(model) -> dict[str, tuple[int, int]]:
    import torch

    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _bfl_modules(transformer, double_subs=None, single_subs=None) -> dict[str, tuple[int, int]]:
    """BFL module name -> (in, out), from the diffusers modules each one fuses."""
    lin = linears(transformer)
    cfg = transformer.config
    out = {}
    for kind, count, table, subs in (("double", cfg.num_layers, DOUBLE, double_subs), ("single", cfg.num_single_layers, SINGLE, single_subs)):
        block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        for i in range(count):
            for sub, names in table.items():
                if subs is not None and sub not in subs:
                    continue
                shapes = [lin[f"{block}.{i}.{n}"] for n in names]
                fin = shapes[0][0] if sub != "linear2" else lin[f"{block}.{i}.proj_out"][0]
                out[f"{kind}_blocks.{i}.{sub}"] = (fin, sum(s[1] for s in shapes))
    return out


def _factors(rng, fin, fout, rank, effect):
    down = (rng.standard_normal((rank, fin)) / np.sqrt(fin)).astype(np.float32)
    up = (rng.standard_normal((fout, rank)) * (effect / np.sqrt(rank))).astype(np.float32)
    return down, up


def write_flux_lora(path: Path, transformer, layout: str, *, rank: int = 4, seed: int = 0, effect: float = 0.5,
                    alpha: float | None = None, text_encoder=None, double_subs=None, single_subs=None,
                    metadata: dict | None = None) -> dict:
    """Write a FLUX.1 LoRA in ``layout`` (kohya_flux, xlabs, diffusers_peft, ai_toolkit); returns
    ``{tensor name: shape}``. ``text_encoder`` adds CLIP-L modules (kohya ``lora_te1_``, peft
    ``text_encoder.``)."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}

    def put(down_key, up_key, fin, fout, alpha_key=None):
        d, u = _factors(rng, fin, fout, rank, effect)
        tensors[down_key], tensors[up_key] = torch.from_numpy(d), torch.from_numpy(u)
        if alpha_key is not None:
            tensors[alpha_key] = torch.tensor(float(alpha if alpha is not None else rank))

    te = linears(text_encoder) if text_encoder is not None else {}
    te = {n: s for n, s in te.items() if ".self_attn." in n or ".mlp." in n}
    if layout == "kohya_flux":
        for name, (fin, fout) in _bfl_modules(transformer, double_subs, single_subs).items():
            k = "lora_unet_" + name.replace(".", "_")
            put(f"{k}.lora_down.weight", f"{k}.lora_up.weight", fin, fout, f"{k}.alpha")
        for name, (fin, fout) in te.items():
            k = "lora_te1_text_model_" + name.replace(".", "_")
            put(f"{k}.lora_down.weight", f"{k}.lora_up.weight", fin, fout, f"{k}.alpha")
    elif layout == "xlabs":
        cfg = transformer.config
        lin = linears(transformer)
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        for i in range(cfg.num_layers):
            for proc, (fin, fout) in (("qkv_lora1", (inner, 3 * inner)), ("proj_lora1", (inner, inner)),
                                      ("qkv_lora2", (inner, 3 * inner)), ("proj_lora2", (inner, inner))):
                k = f"double_blocks.{i}.processor.{proc}"
                put(f"{k}.down.weight", f"{k}.up.weight", fin, fout)
        for i in range(cfg.num_single_layers):
            proj_in = lin[f"single_transformer_blocks.{i}.proj_out"][0]
            for proc, (fin, fout) in (("qkv_lora", (inner, 3 * inner)), ("proj_lora", (proj_in, inner))):
                k = f"single_blocks.{i}.processor.{proc}"
                put(f"{k}.down.weight", f"{k}.up.weight", fin, fout)
    elif layout in ("diffusers_peft", "ai_toolkit"):
        lin = linears(transformer)
        blocks = ("transformer_blocks.", "single_transformer_blocks.")
        for name, (fin, fout) in sorted(lin.items()):
            if not name.startswith(blocks):
                continue
            if layout == "diffusers_peft" and not any(name.endswith("." + t) for t in PEFT_TARGETS):
                continue
            put(f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight", fin, fout)
        for name, (fin, fout) in te.items():
            put(f"text_encoder.{name}.lora_A.weight", f"text_encoder.{name}.lora_B.weight", fin, fout)
    else:
        raise ValueError(layout)
    meta = dict(metadata or {})
    if layout == "ai_toolkit":
        meta.setdefault("software", json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit",
                                                "version": "0.1.0"}))
        meta.setdefault("name", "my_flux_lora_v1")
    if layout == "kohya_flux":
        meta.setdefault("ss_network_module", "networks.lora_flux")
        meta.setdefault("ss_network_dim", str(rank))
        meta.setdefault("ss_network_alpha", str(alpha if alpha is not None else rank))
        meta.setdefault("ss_base_model_version", "flux1")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    return {k: list(v.shape) for k, v in tensors.items()}


def flux_case_text(source: str, protocol: str = "", lora: str = "x.safetensors", lora_extra: str = "") -> str:
    """A small case file's text for the Flux tests: ``source`` as base model, the tiny CLIP
    embedder, the demo prompts with seed 0, then ``protocol`` lines."""
    return f'''
[case]
id = "f"
title = "t"
examiner = "pytest"
question = "q"
[base_model]
source = "{source}"
dtype = "float32"
device = "cpu"
[embedder]
model = "embedded:tiny-clip"
[lora]
path = "{lora}"
{lora_extra}
[protocol]
prompts = "builtin:demo"
seeds = [0]
{protocol}
'''
