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
