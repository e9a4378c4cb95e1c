"""Loading base pipelines and open_clip embedders: embedded tiny models and real checkpoints.

Sources for a base model:
- ``embedded:tiny-sd``: built from code into the cache, then loaded with ``from_pretrained``.
- a local diffusers folder (with ``model_index.json``): ``from_pretrained``.
- a local diffusers folder (links followed, as in a Hugging Face cache snapshot); ``variant``
  (e.g. "fp16") picks ``*.fp16.safetensors`` weight files; pickle-based ``.bin`` weights are refused.
- a single file (``.safetensors``, original LDM/SGM layout as A1111 and Civitai share them):
  ``from_single_file`` with a local config folder, never the network: the carried SD 1.5 / SDXL
  base configs (architecture detected from the tensors), or ``config`` (a diffusers folder or a
  hub id in the local cache) for anything else.
- a hub id (``org/name``): resolved from the local Hugging Face cache only; a download happens
  only when the caller passes ``allow_download=True``.

Every file that affects the images (weights, component configs, scheduler and tokenizer files) is
hashed and listed in ``files``; the manifest records them and ``verify`` names any that changed.
Whatever cannot be resolved offline is one line saying what is missing and how to supply it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.lora.fileformat import PICKLE_EXTENSIONS
from carlos_audit.models.families import EMBEDDED_SOURCES, ensure_embedded, pipeline_family
from carlos_audit.models.flux import load_single_file_flux, single_file_flux_variant
from carlos_audit.models.hub import hf_snapshot
from carlos_audit.models.filehash import file_sha256
from carlos_audit.models.pinned import watermark_kwargs, watermark_record
from carlos_audit.models.world_registry import WORLD_SD, world_model_dir


@dataclass
class LoadedPipeline:
    pipe: object
    identity: str  # e.g. "embedded:tiny-sd", "dir:/path", "file:/path/x.safetensors", "hf:org/name"
    sha256: str  # file sha256 or tree hash of the folder
    architecture: str  # "sd15", "sdxl", "other"
    path: str
    device: str
    dtype: str
    fastpath: dict | None = None  # the settings fastpath.py applied (recorded in the manifest)
    variant: str | None = None  # weight-file variant loaded (e.g. "fp16")
    config_source: str | None = None  # configs a single file was loaded with ("carried:sd15", "dir:x", "hf:id")
    files: list = field(default_factory=list)  # [{"name", "sha256"}] of every file that affects the images
    variant_family: str | None = None  # family variant (models/families.py): "flux-dev", "flux-schnell", ...
    stored_dtypes: list | None = None  # a single file's stored tensor dtypes (float8 is upcast on loading)
    watermarker: dict | None = None  # SDXL invisible watermark: requested, applied (watermark_record)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AuditError(f"device {device!r} requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if device == "cpu" and dtype != "float32":
        raise AuditError(f"dtype {dtype} is not supported on the CPU (use float32)")
    return dtype, getattr(torch, dtype)


def _hub_snapshot(repo_id: str, allow_download: bool, what: str = "base model") -> Path:
    return hf_snapshot(repo_id, allow_download, what=what)


# ----------------------------------------------------------------------------- carried configs

#: Pipeline configs carried in the package, one folder per architecture (model_index.json and the
#: component and tokenizer configs of SD 1.5 and SDXL base 1.0). Single-file checkpoints are loaded
#: with them, offline; the CLIP BPE vocabulary is added from open_clip's bundled file.
CARRIED_CONFIGS = Path(__file__).with_name("configs")
CARRIED_ARCHITECTURES = ("sd15", "sdxl", "flux-dev", "flux-schnell")


def _carried_config_contents(arch: str) -> dict[str, bytes]:
    from carlos_audit.models.tiny import clip_bpe_vocab

    src = CARRIED_CONFIGS / arch
    contents = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    vocab, merges = clip_bpe_vocab()
    vocab_bytes = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    merges_bytes = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    for tok in sorted({rel.split("/", 1)[0] for rel in contents if rel.startswith("tokenizer")}):
        contents[f"{tok}/vocab.json"] = vocab_bytes
        contents[f"{tok}/merges.txt"] = merges_bytes
    return contents


def carried_config_dir(arch: str) -> Path:
    """A diffusers config folder for ``arch`` ("sd15" / "sdxl") that ``from_single_file(config=...)``
    accepts: the carried configs plus tokenizer vocabularies, in ``$CARLOS_AUDIT_HOME/configs``,
    content-addressed and rewritten if any file in it was changed."""
    import shutil

    from carlos_audit.hashing import sha256_bytes, sha256_json
    from carlos_audit.models.tiny import build_into
    from carlos_audit.paths import carlos_home
    from carlos_audit.hashing import tree_files

    if arch not in CARRIED_ARCHITECTURES:
        raise AuditError(f"no carried pipeline configs for architecture {arch!r} (carried: {', '.join(CARRIED_ARCHITECTURES)})")
    contents = _carried_config_contents(arch)
    expected = sorted([rel, sha256_bytes(b)] for rel, b in contents.items())
    dest = carlos_home() / "configs" / f"{arch}-{sha256_json(expected)[:16]}"

    def build(tmp: Path) -> None:
        for rel, data in contents.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    if dest.is_dir() and [e for e in tree_files(dest) if e[0] != ".complete"] != expected:
        shutil.rmtree(dest)
    return build_into(dest, build)


# ----------------------------------------------------------------------------- base-model sources


@dataclass
class BaseSource:
    """Where a base model comes from, and every file that affects its images, hashed."""

    kind: str  # "embedded", "dir", "file", "hf"
    path: Path
    identity: str
    sha256: str  # checkpoint file sha256, or the tree hash of the folder
    architecture: str | None  # known before loading for single files
    config_dir: Path | None  # the config folder a single file is loaded with
    config_source: str | None  # "carried:sd15", "dir:<name>", "hf:<id>"
    files: list[dict]  # [{"name", "sha256"}]: weights, configs, tokenizer files
    components_dir: Path | None = None  # a Flux transformer file: the folder its other components come from
    stored_dtypes: list | None = None


def resolve_base_source(source: str, *, base_dir: Path | None = None, variant: str | None = None,
                        config: str | None = None, allow_download: bool = False) -> BaseSource:
    """Find a base model offline and hash every file that affects its images (links followed)."""
    from carlos_audit.hashing import tree_files

    path = ensure_embedded(source)  # a family's embedded tiny model (models/families.py)
    if path is not None:
        return _folder_source("embedded", path, source, variant, tree_files(path, file_sha256))
    if source == WORLD_SD:  # the trained world's pipeline, package data (models/world_registry.py)
        path = world_model_dir(source)
        return _folder_source("embedded", path, source, variant, tree_files(path, file_sha256))
    p = Path(source).expanduser()
    if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
        p = base_dir / p
    p = Path(os.path.normpath(p.absolute())) if p.exists() else p
    if config and not p.is_file():
        raise AuditError(f"[base_model] config applies to single-file checkpoints only; {source!r} is not a file")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise AuditError(f"base model folder {p} has no model_index.json (not a diffusers folder)")
        check_folder_weights(p, variant, f"base model folder {p}")
        return _folder_source("dir", p, f"dir:{p.name}", variant, tree_files(p, file_sha256))
    if p.is_file():
        if p.suffix.lower() in PICKLE_EXTENSIONS:
            raise AuditError(f"base model {p} is a pickle-based file; only .safetensors single files are accepted")
        if p.suffix.lower() != ".safetensors":
            raise AuditError(f"base model {p}: single-file checkpoints must be .safetensors")
        arch = single_file_architecture(p)
        flux = None if arch else single_file_flux_source(p, config, base_dir, allow_download)
        if flux is not None:
            return flux
        if config:
            config_dir, config_source = user_config_dir(config, base_dir, allow_download)
        elif arch in CARRIED_ARCHITECTURES:
            config_dir, config_source = carried_config_dir(arch), f"carried:{arch}"
        else:
            raise AuditError(
                f"base model {p.name}: not an SD 1.5 or SDXL base checkpoint layout, so its pipeline configs are unknown "
                "offline; set [base_model] config to a diffusers folder (model_index.json, component and tokenizer configs) "
                "or to a hub id in the local Hugging Face cache")
        files = [{"name": f"checkpoint/{p.name}", "sha256": file_sha256(p)}]
        files += [{"name": f"config/{rel}", "sha256": h} for rel, h in tree_files(config_dir) if rel != ".complete"]
        return BaseSource("file", p, f"file:{p.name}", files[0]["sha256"], arch, config_dir, config_source, files)
    if "/" in source and not source.startswith((".", "/")) and source.count("/") == 1:
        snap = _hub_snapshot(source, allow_download)
        check_folder_weights(snap, variant, f"base model {source!r} in the local Hugging Face cache",
                             hint="download them (huggingface-cli download, or pass --allow-download)")
        return _folder_source("hf", snap, f"hf:{source}", variant, tree_files(snap, file_sha256))
    raise AuditError(
        f"base model {source!r} not found; allowed: {', '.join(EMBEDDED_SOURCES)}, {WORLD_SD}, a diffusers folder, "
        "a .safetensors file, or a hub id in the local Hugging Face cache"
    )


def _folder_source(kind: str, path: Path, identity: str, variant: str | None, entries: list) -> BaseSource:
    from carlos_audit.hashing import sha256_json

    return BaseSource(kind, path, identity, sha256_json(entries), None, None, None,
                      [{"name": rel, "sha256": h} for rel, h in entries])


def user_config_dir(config: str, base_dir: Path | None, allow_download: bool) -> tuple[Path, str]:
    c = Path(config).expanduser()
    if base_dir is not None and not c.is_absolute() and (base_dir / c).exists():
        c = base_dir / c
    if c.is_dir():
        if not (c / "model_index.json").is_file():
            raise AuditError(f"[base_model] config {c} has no model_index.json (a diffusers config folder is needed)")
        return c, f"dir:{c.name}"
    if "/" in config and config.count("/") == 1 and not config.startswith((".", "/")):
        return _hub_snapshot(config, allow_download, "[base_model] config"), f"hf:{config}"
    raise AuditError(f"[base_model] config {config!r} is neither a diffusers config folder nor a hub id")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _weight_variant(name: str) -> tuple[bool, str | None]:
    """(is a weight file, its variant) for a diffusers/transformers weight file name."""
    import re

    m = re.match(r"^(.+?)\.(safetensors|bin)\.index(?:\.(\w+))?\.json$", name)
    if m:
        return True, m[3]
    for suffix in (".safetensors", ".bin"):
        if name.endswith(suffix):
            stem = re.sub(r"-\d{5}-of-\d{5}$", "", name[: -len(suffix)])
            return True, stem.split(".", 1)[1] if "." in stem else None
    return False, None


def check_folder_weights(folder: Path, variant: str | None, what: str, hint: str = "") -> None:
    """Every weighted component in model_index.json has safetensors weights for ``variant``;
    otherwise one line naming the component, what it holds and how to fix it."""

    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise AuditError(f"{what}: model_index.json cannot be read: {e}") from None
    for component, spec in sorted(index.items()):
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / component
        if not sub.is_dir() or component.startswith(("tokenizer", "scheduler", "feature_extractor")):
            continue
        weights = {}
        for f in sorted(sub.iterdir()):
            is_weight, v = _weight_variant(f.name)
            if is_weight:
                weights[f.name] = v
        usable = [n for n, v in weights.items() if v == variant and ".safetensors" in n]
        if usable:
            continue
        label = f"variant {variant!r}" if variant else "no variant"
        if not weights:
            fix = hint or "copy the weight files in"
            raise AuditError(f"{what}: component {component} holds no weight files (configs only); {fix}")
        variants = sorted({v for v in weights.values() if v})
        if variants and not any(v == variant for v in weights.values()):
            raise AuditError(f"{what}: component {component} has no weights with {label} (it holds "
                             f"{', '.join(sorted(weights))}); set [base_model] variant = \"{variants[0]}\"")
        raise AuditError(f"{what}: component {component} holds only pickle-based weights ({', '.join(sorted(weights))}) "
                         "for this variant; they are never unpickled: convert them to .safetensors")


def single_file_architecture(path: Path) -> str | None:
    """"sd15" / "sdxl" for an original-layout (LDM/SGM) base checkpoint of those families, else None."""
    from safetensors import safe_open

    from carlos_audit.lora.fileformat import validate_safetensors

    validate_safetensors(path)
    unet = "model.diffusion_model."
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())

        def shape(k):
            return list(f.get_slice(k).get_shape()) if k in keys else None

        in_ch = (shape(unet + "input_blocks.0.0.weight") or [0, 0])[1]
        if in_ch != 4:
            return None
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        to_k = shape(unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if any(k.startswith("cond_stage_model.transformer.") for k in keys) and to_k and to_k[1] == 768:
            return "sd15"
    return None


def single_file_flux_source(path: Path, config: str | None, base_dir: Path | None, allow_download: bool):
    """The BaseSource of a FLUX.1 transformer checkpoint (None if ``path`` is not one): the
    file, the carried transformer config of its variant, and the components folder
    (``[base_model] config``), every file hashed."""
    from carlos_audit.hashing import sha256_file
    from carlos_audit.hashing import tree_files

    variant, dtypes = single_file_flux_variant(path)
    if variant is None:
        return None
    if not config:
        raise AuditError(f"base model {path.name} is a {variant} transformer checkpoint only; set [base_model] config "
                         "to a diffusers FLUX.1 folder or a hub id in the local Hugging Face cache for the VAE, "
                         "CLIP-L and T5 encoders")
    components, label = user_config_dir(config, base_dir, allow_download)
    config_dir = carried_config_dir(variant)
    files = [{"name": f"checkpoint/{path.name}", "sha256": sha256_file(path)}]
    files += [{"name": f"config/{rel}", "sha256": h} for rel, h in tree_files(config_dir) if rel != ".complete"]
    files += [{"name": f"components/{rel}", "sha256": h} for rel, h in tree_files(components)
              if rel != ".complete" and not rel.startswith("transformer/")]
    return BaseSource("file", path, f"file:{path.name}", files[0]["sha256"], "flux", config_dir,
                      f"carried:{variant}+components:{label}", files, components, dtypes)


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class BaseLoad:
    """How ``load_base_pipeline`` loads: dtype and device ("auto" resolved here), hub downloads
    allowed, the folder relative sources are resolved against, the weights variant, a carried
    config for a single file, and ``add_watermarker`` (passed to pipelines that take it, SDXL;
    never left to diffusers' default)."""

    dtype: str = "auto"
    device: str = "auto"
    allow_download: bool = False
    base_dir: Path | None = None
    variant: str | None = None
    config: str | None = None
    add_watermarker: bool = False


def load_base_pipeline(source: str, **options) -> LoadedPipeline:
    """Load a base pipeline offline (see the module doc); every failure is one AuditError line.
    ``options``: the fields of ``BaseLoad``."""
    how = BaseLoad(**options)
    dev = resolve_device(how.device)
    dtype_name, torch_dtype = resolve_dtype(how.dtype, dev)
    variant, add_watermarker = how.variant, how.add_watermarker
    src = resolve_base_source(source, base_dir=how.base_dir, variant=variant, config=how.config,
                              allow_download=how.allow_download)
    try:
        pipe = _from_source(src, torch_dtype, variant, how.allow_download, add_watermarker)
    except AuditError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise AuditError(f"cannot load base model {src.identity}: {type(e).__name__}: {first}") from None
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    from carlos_audit.models.fastpath import apply_fastpath

    arch, family_variant = pipeline_family(pipe)
    fastpath = apply_fastpath(pipe, dev, dtype_name, arch)  # a no-op on the CPU
    # the embedded model is built from code on each machine: no machine path recorded
    path = f"$CARLOS_AUDIT_HOME/models/{src.path.name}" if src.kind == "embedded" else str(src.path)
    path = "carlos_audit/models/world/pipeline" if src.identity == WORLD_SD else path  # package data
    return LoadedPipeline(pipe, src.identity, src.sha256, arch, path, dev, dtype_name, fastpath,
                          variant, src.config_source, src.files, family_variant, src.stored_dtypes,
                          watermark_record(pipe, add_watermarker))


def _from_source(src: BaseSource, torch_dtype, variant: str | None, allow_download: bool, add_watermarker: bool = False):
    from diffusers import (
        DiffusionPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if src.components_dir is not None:  # a FLUX.1 transformer file
        return load_single_file_flux(src.path, src.config_dir, src.components_dir, torch_dtype)
    if src.kind == "file":
        index = json.loads((src.config_dir / "model_index.json").read_text("utf-8"))
        cls = StableDiffusionXLPipeline if index.get("_class_name") == "StableDiffusionXLPipeline" else StableDiffusionPipeline
        return cls.from_single_file(str(src.path), config=str(src.config_dir), local_files_only=True, dtype=torch_dtype,
                                    **watermark_kwargs(cls, add_watermarker))
    kwargs = {"variant": variant} if variant else {}
    cls = StableDiffusionPipeline if src.identity == "embedded:tiny-sd" else DiffusionPipeline
    named = json.loads((src.path / "model_index.json").read_text("utf-8")).get("_class_name", "")
    import diffusers

    kwargs.update(watermark_kwargs(getattr(diffusers, named, cls), add_watermarker))
    return cls.from_pretrained(src.path, local_files_only=True, use_safetensors=True, dtype=torch_dtype, **kwargs)


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if type(pipe.scheduler).__name__ == name:
        return
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise AuditError(f"unknown scheduler {name!r} (use a diffusers scheduler class name, e.g. DDIMScheduler)")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


