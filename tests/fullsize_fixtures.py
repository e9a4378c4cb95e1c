"""Full-size SD 1.5 / SDXL pipelines with random weights, for tests and benches.

Built from the carried pipeline configs (``models/configs/<arch>``): each component is
instantiated on the meta device (shapes only), then every tensor is written one by one, as small
seeded normals rounded to float16-representable values, straight into a safetensors file. The
whole model is never in memory (SD 1.5 builds in ~1.2 GB, SDXL in ~1.5 GB). Because every value is
representable in float16, the float32 folder, its ``fp16`` variant and the float16 single file
hold the same numbers and give the same images in float32.

Built once per machine into ``$CARLOS_AUDIT_FIXTURES`` (default
``${XDG_CACHE_HOME:-~/.cache}/carlos-audit-fixtures``) and reused.

Also here: the LDM (original / A1111 / Civitai) single-file layout of an SD 1.5 folder, and kohya
LoRAs with kohya's default module set (every Linear/Conv2d of the UNet's transformer blocks and of
the text encoders' attention and MLP: 264 modules for SD 1.5, 986 for SDXL).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from carlos_audit.models.tiny import build_into

FIXTURES_VERSION = 1
_DTYPES = {"float32": "F32", "float16": "F16"}
MODEL_COMPONENTS = {  # component -> (library class, weights file stem)
    "unet": ("UNet2DConditionModel", "diffusion_pytorch_model"),
    "vae": ("AutoencoderKL", "diffusion_pytorch_model"),
    "text_encoder": (None, "model"),
    "text_encoder_2": (None, "model"),
}


def fixtures_home() -> Path:
    env = os.environ.get("CARLOS_AUDIT_FIXTURES")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carlos-audit-fixtures"


# ----------------------------------------------------------------------------- tensor writing


def random_tensor(name: str, shape, torch_dtype):
    """Seeded by the tensor's name: small normals (norm weights 1, biases 0), float16-exact."""
    import torch

    if len(shape) == 1 and name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch_dtype)
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, dtype=torch_dtype)
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g) * 0.02
    return t.to(torch.float16).to(torch_dtype)


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple], make, dtype: str = "float32",
                                metadata: dict | None = None) -> Path:
    """Write a safetensors file tensor by tensor: ``make(name, shape, torch_dtype)`` gives each one."""
    import torch

    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            t = make(name, shape, torch_dtype).contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().tobytes())
    return path


def component_shapes(config_dir: Path, component: str) -> dict[str, tuple]:
    """The state-dict shapes of one component, from its config, on the meta device."""
    import torch

    with torch.device("meta"):
        model = meta_component(config_dir, component)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def meta_component(config_dir: Path, component: str):
    """A component built from its config (call under ``torch.device("meta")`` for shapes only)."""
    import diffusers
    import transformers

    cls_name = json.loads((config_dir / "model_index.json").read_text())[component][1]
    folder = config_dir / component
    if component.startswith("text_encoder"):
        cls = getattr(transformers, cls_name)
        return cls(transformers.CLIPTextConfig.from_pretrained(folder))
    cls = getattr(diffusers, cls_name)
    return cls.from_config(cls.load_config(folder))


# ----------------------------------------------------------------------------- pipelines


def ensure_random_pipeline(arch: str, variant: str | None = None, home: Path | None = None) -> Path:
    """A diffusers folder of the full-size ``arch`` ("sd15" / "sdxl") with random weights.

    ``variant="fp16"`` writes float16 ``*.fp16.safetensors`` weight files only (no default ones).
    """
    from carlos_audit.models.loading import carried_config_dir

    name = f"{arch}-random-v{FIXTURES_VERSION}" + (f"-{variant}" if variant else "")
    dest = (home or fixtures_home()) / name

    def build(tmp: Path) -> None:
        config_dir = carried_config_dir(arch)
        shutil.copytree(config_dir, tmp, dirs_exist_ok=True)
        (tmp / ".complete").unlink(missing_ok=True)
        index = json.loads((config_dir / "model_index.json").read_text())
        for component, (_, stem) in MODEL_COMPONENTS.items():
            if component not in index:
                continue
            suffix = f".{variant}.safetensors" if variant else ".safetensors"
            dtype = "float16" if variant == "fp16" else "float32"
            write_safetensors_streaming(tmp / component / (stem + suffix), component_shapes(config_dir, component),
                                        random_tensor, dtype, metadata={"format": "pt"})

    return build_into(dest, build)


# ----------------------------------------------------------------------------- LDM single file (SD 1.5)


def _ldm_resnet(rest: str) -> str:
    for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def ldm_unet_name(name: str, attention_up_blocks: set[int]) -> str:
    """diffusers UNet tensor name -> original (LDM/SGM) name, layers_per_block = 2."""
    p = name.split(".")
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for a, b in simple.items():
        if name.startswith(a + "."):
            return b + name[len(a):]
    rest = ".".join(p[4:])
    if p[0] == "down_blocks":
        b, kind, i = int(p[1]), p[2], int(p[3])
        if kind == "resnets":
            return f"input_blocks.{3 * b + i + 1}.0.{_ldm_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{3 * b + i + 1}.1.{rest}"
        return f"input_blocks.{3 * (b + 1)}.0.op.{'.'.join(p[5:])}"
    if p[0] == "mid_block":
        i, rest = int(p[2]), ".".join(p[3:])
        if p[1] == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * i}.{_ldm_resnet(rest)}"
    if p[0] == "up_blocks":
        b, kind, i = int(p[1]), p[2], int(p[3])
        if kind == "resnets":
            return f"output_blocks.{3 * b + i}.0.{_ldm_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{3 * b + i}.1.{rest}"
        return f"output_blocks.{3 * b + 2}.{2 if b in attention_up_blocks else 1}.conv.{'.'.join(p[5:])}"
    raise ValueError(f"no LDM name for UNet tensor {name}")


def ldm_vae_name(name: str, n_blocks: int = 4) -> tuple[str, bool]:
    """diffusers VAE tensor name -> (LDM name, is a mid-attention weight that LDM stores as 1x1 conv)."""
    p = name.split(".")
    head, rest = p[0], p[1:]
    if head in ("quant_conv", "post_quant_conv"):
        return name, False
    if rest[0] == "conv_norm_out":
        return f"{head}.norm_out.{'.'.join(rest[1:])}", False
    if rest[0] in ("conv_in", "conv_out"):
        return name, False
    if rest[0] == "mid_block":
        if rest[1] == "attentions":
            attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
            tail = rest[-1]
            return f"{head}.mid.attn_1.{attn}.{tail}", attn != "norm" and tail == "weight"
        return f"{head}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:]).replace('conv_shortcut', 'nin_shortcut')}", False
    blocks = "down" if head == "encoder" else "up"
    i = int(rest[1]) if head == "encoder" else n_blocks - 1 - int(rest[1])
    if rest[2] == "resnets":
        return f"{head}.{blocks}.{i}.block.{rest[3]}.{'.'.join(rest[4:]).replace('conv_shortcut', 'nin_shortcut')}", False
    sampler = "downsample" if head == "encoder" else "upsample"
    return f"{head}.{blocks}.{i}.{sampler}.{'.'.join(rest[4:])}", False


def ensure_sd15_single_file(home: Path | None = None) -> Path:
    """The SD 1.5 random pipeline as one float16 LDM-layout ``.safetensors`` file (A1111/Civitai style)."""
    from safetensors import safe_open

    folder = ensure_random_pipeline("sd15", home=home)
    dest = (home or fixtures_home()) / f"sd15-random-v{FIXTURES_VERSION}-single"

    def build(tmp: Path) -> None:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        attention_up = {i for i, t in enumerate(unet_cfg["up_block_types"]) if t.startswith("CrossAttn")}
        sources, shapes = {}, {}
        for component, prefix in (("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                                  ("text_encoder", "cond_stage_model.transformer.")):
            f = folder / component / ("model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors")
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shape = tuple(h.get_slice(k).get_shape())
                    conv = False
                    if component == "unet":
                        ldm = ldm_unet_name(k, attention_up)
                    elif component == "vae":
                        ldm, conv = ldm_vae_name(k)
                    else:
                        ldm = k if k.startswith("text_model.") else "text_model." + k
                    if conv:
                        shape = shape + (1, 1)
                    sources[prefix + ldm] = (f, k)
                    shapes[prefix + ldm] = shape

        def make(name, shape, torch_dtype):
            f, k = sources[name]
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(k).reshape(shape).to(torch_dtype)

        write_safetensors_streaming(tmp / "sd15-random.safetensors", shapes, make, "float16")

    return build_into(dest, build) / "sd15-random.safetensors"


# ----------------------------------------------------------------------------- LoRA files


def _sgm_prefix(name: str) -> str:
    """diffusers UNet attention path -> SGM (kohya SDXL) block prefix, layers_per_block = 2."""
    p = name.split(".")
    if p[0] == "down_blocks":
        return f"input_blocks.{3 * int(p[1]) + int(p[3]) + 1}.1." + ".".join(p[4:])
    if p[0] == "mid_block":
        return "middle_block.1." + ".".join(p[3:])
    return f"output_blocks.{3 * int(p[1]) + int(p[3])}.1." + ".".join(p[4:])


def kohya_default_modules(arch: str) -> dict[str, tuple[str, tuple]]:
    """kohya's default LoRA targets for ``arch``: ``{kohya module name: (diffusers name, weight shape)}``.

    Every Linear/Conv2d inside the UNet's transformer (attention) blocks, and the text encoders'
    attention and MLP projections: 264 modules for SD 1.5, 986 for SDXL. SD 1.5 UNet names keep the
    diffusers path; SDXL ones use the original ``input_blocks_*`` / ``middle_block_*`` /
    ``output_blocks_*`` names, as kohya writes them.
    """
    import torch

    from carlos_audit.models.loading import carried_config_dir

    config_dir = carried_config_dir(arch)
    out = {}
    with torch.device("meta"):
        unet = meta_component(config_dir, "unet")
        for name, m in unet.named_modules():
            if ".attentions." in f".{name}" and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                body = _sgm_prefix(name) if arch == "sdxl" else name
                out["lora_unet_" + body.replace(".", "_")] = (f"unet.{name}", tuple(m.weight.shape))
        encoders = (("text_encoder", "lora_te_"),) if arch == "sd15" else (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_"))
        for component, prefix in encoders:
            te = meta_component(config_dir, component)
            for name, m in te.named_modules():
                if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
                    body = name if name.startswith("text_model.") else "text_model." + name
                    out[prefix + body.replace(".", "_")] = (f"{component}.{name}", tuple(m.weight.shape))
            del te
    return out


def write_kohya_lora(arch: str, path: Path, rank: int = 4, alpha: float = 2.0, metadata: dict | None = None,
                     only: str | None = None, dtype: str = "float16") -> Path:
    """A kohya LoRA with kohya's default module set (``only="unet"`` keeps the UNet modules), seeded."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for kohya, (_, shape) in kohya_default_modules(arch).items():
        if only and not kohya.startswith(f"lora_{only}_"):
            continue
        extra = tuple(shape[2:]) and (1, 1)
        down = random_tensor(kohya + ".down", (rank, shape[1]) + tuple(shape[2:]), torch.float32) * 5
        up = random_tensor(kohya + ".up", (shape[0], rank) + extra, torch.float32) * 5
        tensors[f"{kohya}.lora_down.weight"] = down.to(getattr(torch, dtype))
        tensors[f"{kohya}.lora_up.weight"] = up.to(getattr(torch, dtype))
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha, dtype=getattr(torch, dtype))
    save_file(tensors, str(path), metadata=metadata or {"ss_network_module": "networks.lora"})
    return path


def write_peft_lora(arch: str, path: Path, rank: int = 4, text_model_prefix: bool = True) -> Path:
    """A diffusers/peft-format LoRA (``<component>.<path>.lora_A.weight``) on the UNet's cross-attention
    and the first text encoder's attention, as diffusers saves it (``text_encoder.text_model.`` with
    transformers 4, ``text_encoder.`` with transformers 5: ``text_model_prefix`` picks)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for kohya, (name, shape) in kohya_default_modules(arch).items():
        component, body = name.split(".", 1)
        if component == "unet" and ".attn2." not in body or component == "text_encoder_2" or len(shape) != 2:
            continue
        if component == "text_encoder" and ".self_attn." not in body:
            continue
        body = body.removeprefix("text_model.")
        if component == "text_encoder" and text_model_prefix:
            body = "text_model." + body
        tensors[f"{component}.{body}.lora_A.weight"] = random_tensor(kohya + ".A", (rank, shape[1]), torch.float32) * 5
        tensors[f"{component}.{body}.lora_B.weight"] = random_tensor(kohya + ".B", (shape[0], rank), torch.float32) * 5
    save_file(tensors, str(path))
    return path


def write_lycoris_lora(arch: str, path: Path, kind: str, n_modules: int = 8) -> Path:
    """A LyCORIS LoHa (``kind="loha"``) or LoKr (``"lokr"``) file in kohya naming on UNet linear modules."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    linear = [(k, s) for k, (_, s) in kohya_default_modules(arch).items() if k.startswith("lora_unet_") and len(s) == 2]
    for kohya, (out_f, in_f) in linear[:n_modules]:
        r = 4
        if kind == "loha":
            for w, shape in (("hada_w1_a", (out_f, r)), ("hada_w1_b", (r, in_f)), ("hada_w2_a", (out_f, r)), ("hada_w2_b", (r, in_f))):
                tensors[f"{kohya}.{w}"] = random_tensor(kohya + w, shape, torch.float32) * 5
        else:
            tensors[f"{kohya}.lokr_w1"] = random_tensor(kohya + "w1", (4, 4), torch.float32) * 5
            tensors[f"{kohya}.lokr_w2"] = random_tensor(kohya + "w2", (out_f // 4, in_f // 4), torch.float32) * 5
        tensors[f"{kohya}.alpha"] = torch.tensor(float(r))
    save_file(tensors, str(path))
    return path
