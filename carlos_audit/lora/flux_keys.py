"""FLUX.1 LoRA key maps: the tensor names each trainer writes, the layout of a file, and the
diffusers modules (with row ranges) each module of the file lands on.

Layouts (the authority for each mapping is diffusers' own conversion code,
``diffusers/loaders/lora_conversion_utils.py``, which is what loads them):

* ``diffusers_peft``: ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``
  (``save_lora_weights``; ``text_encoder.`` for CLIP-L);
* ``ai_toolkit``: the same names, written by ostris' ai-toolkit (its ``software`` metadata says so);
* ``kohya_flux``: sd-scripts ``networks/lora_flux.py``: ``lora_unet_double_blocks_<i>_<img|txt>_
  <attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin>``, ``lora_unet_single_blocks_<i>_<linear1|linear2|
  modulation_lin>`` (Black Forest Labs module names; qkv and linear1 fused), ``.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``; ``lora_te1_`` for CLIP-L
  (``_convert_kohya_flux_lora_to_diffusers``);
* ``xlabs``: XLabs-AI x-flux: ``double_blocks.<i>.processor.<qkv_lora1|proj_lora1|qkv_lora2|
  proj_lora2>.<down|up>.weight``, ``single_blocks.<i>.processor.<qkv_lora|proj_lora>...``
  (``_convert_xlabs_flux_lora_to_diffusers``).

A fused module of the file (``img_attn.qkv``, ``linear1``, ``qkv_lora1``) is split row-wise over
several diffusers modules; ``targets`` gives them with their row ranges.
"""

from __future__ import annotations

import re

LAYOUTS = ("diffusers_peft", "ai_toolkit", "kohya_flux", "xlabs")

_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale"}

# Black Forest Labs sub-module -> diffusers modules (a fused module splits over several, in row order)
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
                "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"}
XLABS_SINGLE = {"qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",)}

_KOHYA_BODY = {k.replace(".", "_"): k for k in (*DOUBLE, *SINGLE, *GLOBAL)}
_KOHYA_BLOCK = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(\w+?)\.(.+)$")
_KOHYA_GLOBAL = re.compile(r"^lora_unet_(img_in|txt_in|time_in_in_layer|time_in_out_layer|vector_in_in_layer|"
                           r"vector_in_out_layer|guidance_in_in_layer|guidance_in_out_layer|final_layer_linear)\.(.+)$")
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)\.(down|up)\.weight$")


def parse_flux_key(key: str) -> tuple[str, str, str] | None:
    """``(style, module, role)`` for a kohya-Flux or XLabs tensor name, else None (diffusers/peft
    names are parsed by ``keys.parse_key``). The module is the Black Forest Labs name under
    ``transformer.`` (``transformer.double_blocks.0.img_attn.qkv``; XLabs keeps its processor
    names: ``transformer.double_blocks.0.processor.qkv_lora1``)."""
    m = _KOHYA_BLOCK.match(key)
    if m:
        kind, i, body, suffix = m.groups()
        sub = _KOHYA_BODY.get(body, body)
        return "kohya", f"transformer.{kind}_blocks.{i}.{sub}", _ROLES.get(suffix, f"other:{suffix}")
    m = _KOHYA_GLOBAL.match(key)
    if m:
        return "kohya", f"transformer.{_KOHYA_BODY[m[1]]}", _ROLES.get(m[2], f"other:{m[2]}")
    m = _XLABS.match(key)
    if m:
        kind, i, proc, ud = m.groups()
        return "xlabs", f"transformer.{kind}_blocks.{i}.processor.{proc}", ud
    return None


_FLUX_NAMES = re.compile(r"^transformer\.(double_blocks|single_blocks|single_transformer_blocks)\.")
_DOUBLE_STREAM = re.compile(r"^transformer\.transformer_blocks\.\d+\.(attn\.add_[qkv]_proj|attn\.to_add_out|ff_context\.|norm1_context\.)")


def is_flux(modules: dict[str, dict]) -> str | None:
    """The rule that makes a LoRA's modules FLUX.1 (None if they are not): Black Forest Labs block
    names (``double_blocks`` / ``single_blocks``), diffusers' ``single_transformer_blocks``, or
    double-stream text modules (``add_q_proj``, ``ff_context``...) of width 3072 (FLUX.1's inner
    dim; SD3's joint blocks are 1536 or 2432 wide)."""
    names = [n for n in modules if n.startswith("transformer.")]
    if any(_FLUX_NAMES.match(n) for n in names):
        return "FLUX.1 block names (double_blocks / single_blocks / single_transformer_blocks)"
    if any(_DOUBLE_STREAM.match(n) and modules[n].get("in_features") == 3072 for n in names):
        return "double-stream text modules of width 3072 (FLUX.1)"
    return None


def layout(header: dict) -> str | None:
    """The FLUX.1 layout of a safetensors header (see the module doc), None if not a Flux layout."""
    keys = [k for k in header if k != "__metadata__"]
    if any(_KOHYA_BLOCK.match(k) or _KOHYA_GLOBAL.match(k) for k in keys):
        return "kohya_flux"
    if any(_XLABS.match(k) for k in keys):
        return "xlabs"
    if any(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys):
        software = str((header.get("__metadata__") or {}).get("software", ""))
        return "ai_toolkit" if "ai-toolkit" in software else "diffusers_peft"
    return None


def targets(module: str, out_features: int | None, inner_dim: int) -> list[tuple[str, int, int]]:
    """The diffusers modules ``(name, first row, end row)`` a module of the file lands on, rows of
    its up factor in order; ``inner_dim`` is the transformer's width (3072 for FLUX.1). A diffusers
    name maps onto itself."""
    out = out_features or 0
    m = re.match(r"^transformer\.(double|single)_blocks\.(\d+)\.(.+)$", module)
    if m:
        kind, i, sub = m.groups()
        block = f"transformer.{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{i}"
        if sub.startswith("processor."):
            proc = sub.split(".", 1)[1]
            if kind == "double" and proc in XLABS_DOUBLE:
                names = DOUBLE[XLABS_DOUBLE[proc]]
            elif kind == "single" and proc in XLABS_SINGLE:
                names = XLABS_SINGLE[proc]
            else:
                return []
        else:
            names = (DOUBLE if kind == "double" else SINGLE).get(sub)
            if names is None:
                return []
        if len(names) == 4:  # single-block linear1: q, k, v (inner each), then the MLP input
            sizes = [inner_dim] * 3 + [out - 3 * inner_dim]
        else:
            sizes = [out // len(names)] * len(names)
        rows, start = [], 0
        for name, size in zip(names, sizes):
            rows.append((f"{block}.{name}", start, start + size))
            start += size
        return rows
    for bfl, name in GLOBAL.items():
        if module == f"transformer.{bfl}":
            return [(f"transformer.{name}", 0, out)]
    return [(module, 0, out)]


def blocks_touched(modules) -> dict:
    """Which double- and single-stream blocks a Flux LoRA's modules touch, and the other parts."""
    double, single, other = set(), set(), set()
    for name in modules:
        m = re.match(r"^transformer\.(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)\.(\d+)\.", name)
        if m:
            (double if m[1] in ("double_blocks", "transformer_blocks") else single).add(int(m[2]))
        else:
            other.add(name.split(".", 1)[0] if not name.startswith("transformer.") else name)
    return {"double": sorted(double), "single": sorted(single), "other": sorted(other)}


def resolve(target: str, linears) -> str:
    """A text-encoder target as the model names it: transformers 5's CLIPTextModel has no
    ``text_model.`` level (kohya's ``lora_te1_text_model_...`` names, and diffusers' conversion
    of them, still carry it)."""
    bare = target.replace("text_encoder.text_model.", "text_encoder.", 1)
    return bare if target not in linears and bare in linears else target


def map_modules(rows: list[dict], linears: dict[str, tuple[int, int]], inner_dim: int) -> dict:
    """Map the modules of a Flux LoRA (``inspect_lora`` rows) onto a model's linear layers by the
    key maps, checking shapes: ``linears`` is ``{"component.module": (in_features, out_features)}``
    of the real model (full size on the meta device, or loaded). Returns ``{"mapped": {module:
    [targets in row order]}, "skipped": [{"module", "reason"}]}``; every module is one or the other.
    """
    mapped, skipped = {}, []
    for row in rows:
        name, fin, fout = row["name"], row.get("in_features"), row.get("out_features")
        rows_of = targets(name, fout, inner_dim)
        reason = None
        if not rows_of:
            reason = "no FLUX.1 module of this name in the key maps"
        rows_of = [(resolve(t, linears), a, b) for t, a, b in rows_of]
        for target, start, end in rows_of:
            if reason:
                break
            if target not in linears:
                reason = f"maps to {target}, which is not a linear layer of the model"
            elif linears[target][0] != fin:
                reason = f"maps to {target} with {linears[target][0]} in-features; the file's module has {fin}"
            elif linears[target][1] != end - start:
                reason = f"rows {start}..{end} map to {target}, which has {linears[target][1]} out-features"
        if reason is None and rows_of and rows_of[-1][2] != fout:
            reason = f"its {fout} rows are not covered by {', '.join(t for t, _, _ in rows_of)}"
        if reason:
            skipped.append({"module": name, "reason": reason})
        else:
            mapped[name] = [t for t, _, _ in rows_of]
    return {"mapped": mapped, "skipped": skipped}
