"""Loading base pipelines and open_clip embedders: embedded tiny models and real checkpoints.

Sources for a base model:
- ``embedded:tiny-sd``: built from code into the cache, then loaded with ``from_pretrained``.
- a local diffusers folder (with ``model_index.json``): ``from_pretrained``.
- a single file (``.safetensors``): ``from_single_file`` (SD 1.5 or SDXL detected from keys).
- a hub id (``org/name``): resolved from the local Hugging Face cache only; a download happens
  only when the caller passes ``allow_download=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_file
from carlos_audit.lora.fileformat import PICKLE_EXTENSIONS
from carlos_audit.models.tiny import ensure_tiny_clip, ensure_tiny_sd, tree_sha256


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


def _architecture_of_pipe(pipe) -> str:
    name = type(pipe).__name__
    if "XL" in name:
        return "sdxl"
    cad = getattr(pipe.unet.config, "cross_attention_dim", None)
    if cad == 768:
        return "sd15"
    return "other"


def _hub_snapshot(repo_id: str, allow_download: bool) -> Path:
    import os

    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE")  # read at call time, not at import
    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download, cache_dir=cache_dir))
    except Exception as e:  # LocalEntryNotFoundError, offline errors, ...
        hint = "" if allow_download else " (only the local Hugging Face cache is searched; pass --allow-download to fetch it)"
        raise AuditError(f"base model {repo_id!r} is not available locally{hint}: {type(e).__name__}") from None


def load_base_pipeline(source: str, *, dtype: str = "auto", device: str = "auto",
                       allow_download: bool = False, base_dir: Path | None = None) -> LoadedPipeline:
    from diffusers import (
        DiffusionPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    dev = resolve_device(device)
    dtype_name, torch_dtype = resolve_dtype(dtype, dev)
    kwargs = dict(dtype=torch_dtype)
    if source == "embedded:tiny-sd":
        path = ensure_tiny_sd()
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
        identity, digest = source, tree_sha256(path)
        path = f"$CARLOS_AUDIT_HOME/models/{path.name}"  # built from code on each machine: no machine path recorded
    else:
        p = Path(source)
        if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
            p = base_dir / p
        if p.is_dir():
            if not (p / "model_index.json").is_file():
                raise AuditError(f"base model folder {p} has no model_index.json (not a diffusers folder)")
            pipe = DiffusionPipeline.from_pretrained(p, local_files_only=True, **kwargs)
            path, identity, digest = p, f"dir:{p.name}", tree_sha256(p)
        elif p.is_file():
            if p.suffix.lower() in PICKLE_EXTENSIONS:
                raise AuditError(f"base model {p} is a pickle-based file; only .safetensors single files are accepted")
            if p.suffix.lower() != ".safetensors":
                raise AuditError(f"base model {p}: single-file checkpoints must be .safetensors")
            cls = StableDiffusionXLPipeline if _single_file_is_sdxl(p) else StableDiffusionPipeline
            try:
                pipe = cls.from_single_file(str(p), local_files_only=not allow_download, **kwargs)
            except Exception as e:
                raise AuditError(f"cannot load single-file checkpoint {p}: {type(e).__name__}: {e}") from None
            path, identity, digest = p, f"file:{p.name}", sha256_file(p)
        elif "/" in source and not source.startswith((".", "/")) and source.count("/") == 1:
            snap = _hub_snapshot(source, allow_download)
            pipe = DiffusionPipeline.from_pretrained(snap, local_files_only=True, **kwargs)
            path, identity, digest = snap, f"hf:{source}", tree_sha256(snap)
        else:
            raise AuditError(
                f"base model {source!r} not found; allowed: embedded:tiny-sd, a diffusers folder, "
                "a .safetensors file, or a hub id in the local Hugging Face cache"
            )
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    from carlos_audit.run.fastpath import apply_fastpath

    arch = _architecture_of_pipe(pipe)
    fastpath = apply_fastpath(pipe, dev, dtype_name, arch)  # a no-op on the CPU
    return LoadedPipeline(pipe, identity, digest, arch, str(path), dev, dtype_name, fastpath)


def _single_file_is_sdxl(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        return any(k.startswith("conditioner.embedders.1") for k in keys)


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if type(pipe.scheduler).__name__ == name:
        return
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise AuditError(f"unknown scheduler {name!r} (use a diffusers scheduler class name, e.g. DDIMScheduler)")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


# --------------------------------------------------------------------------- embedders


@dataclass
class LoadedEmbedder:
    model: object
    preprocess: object
    tokenizer: object
    identity: str  # "embedded:tiny-clip", "open_clip:ViT-B-32/openai", "open_clip:ViT-B-32/file:x"
    sha256: str | None
    feature_dim: int
    device: str
    preprocess_description: str


def load_embedder(model: str, pretrained: str | None, *, device: str = "cpu",
                  allow_download: bool = False, allow_unsafe_pickle: bool = False,
                  base_dir: Path | None = None) -> LoadedEmbedder:
    import open_clip
    import torch

    if model == "embedded:tiny-clip":
        path = ensure_tiny_clip()
        name, pre, identity, digest = f"local-dir:{path}", None, model, tree_sha256(path)
    else:
        name, identity, digest, pre = model, f"open_clip:{model}/{pretrained}", None, pretrained
        if pretrained:
            pp = Path(pretrained)
            if base_dir is not None and not pp.is_absolute() and (base_dir / pp).exists():
                pp = base_dir / pp
            if pp.exists():
                if pp.suffix.lower() in PICKLE_EXTENSIONS and not allow_unsafe_pickle:
                    raise AuditError(f"embedder checkpoint {pp} is pickle-based; refused unless --allow-unsafe-pickle")
                pre, identity, digest = str(pp), f"open_clip:{model}/file:{pp.name}", sha256_file(pp)
            elif not allow_download and not _open_clip_cached(model, pretrained):
                raise AuditError(
                    f"embedder weights {model}/{pretrained} are not available locally; "
                    "give a checkpoint path as `pretrained`, or pass --allow-download"
                )
    try:
        m, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pre, device=device)
    except Exception as e:
        raise AuditError(f"cannot load embedder {identity}: {type(e).__name__}: {e}") from None
    m.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        dim = int(m.encode_image(torch.zeros(1, 3, *_image_size(m), device=device)).shape[-1])
    return LoadedEmbedder(m, preprocess, tokenizer, identity, digest, dim, device, repr(preprocess))


def _image_size(model) -> tuple[int, int]:
    size = model.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _open_clip_cached(model: str, pretrained: str) -> bool:
    """True when open_clip would find the tagged weights without the network."""
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        hub = cfg.get("hf_hub", "")
        if not hub:
            return False
        repo = hub.rstrip("/")
        for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, fn), str):
                return True
    except Exception:
        return False
    return False
