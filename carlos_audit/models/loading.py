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
    return hf_snapshot(repo_id, allow_download, what="base model")


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
    kind: str = "open_clip"  # or "hf-transformers" (preprocess is then a CLIPProcessor)


def load_embedder(model: str, pretrained: str | None, *, device: str = "cpu",
                  allow_download: bool = False, allow_unsafe_pickle: bool = False,
                  base_dir: Path | None = None) -> LoadedEmbedder:
    if is_hf_embedder(model):
        return load_hf_embedder(model, device=device, allow_download=allow_download,
                                allow_unsafe_pickle=allow_unsafe_pickle, base_dir=base_dir)
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


# --------------------------------------------------------------------------- transformers CLIP (the reference's embedder)

HF_EMBEDDER_PREFIX = "hf:"
HF_IDENTITY_PREFIX = "hf-transformers:"
TINY_HF_CLIP = "embedded:tiny-hf-clip"


def is_hf_embedder(model: str) -> bool:
    return model.startswith(HF_EMBEDDER_PREFIX) or model == TINY_HF_CLIP


def hf_embedder_identity(model: str, base_dir: Path | None = None) -> str:
    """The signature identity of ``[embedder] model`` (no weights loaded): ``hf-transformers:<hub id>``
    (what the CARLoS preset records), ``hf-transformers:dir:<folder name>``, or the embedded name."""
    if model == TINY_HF_CLIP:
        return model
    ref = model[len(HF_EMBEDDER_PREFIX):]
    folder = hf_local_folder(ref, base_dir)
    return HF_IDENTITY_PREFIX + (f"dir:{folder.name}" if folder is not None else ref)


def hf_local_folder(ref: str, base_dir: Path | None) -> Path | None:
    p = Path(ref).expanduser()
    if base_dir is not None and not p.is_absolute():
        p = base_dir / p
    return p if p.is_dir() else None


def load_hf_embedder(model: str, *, device: str = "cpu", allow_download: bool = False,
                     allow_unsafe_pickle: bool = False, base_dir: Path | None = None) -> LoadedEmbedder:
    """transformers ``CLIPModel`` + ``CLIPProcessor``, as the CARLoS reference loads them: a hub id
    from the local Hugging Face cache only (unless ``allow_download``), or a local folder.
    Weights are read from safetensors files unless ``allow_unsafe_pickle``."""
    from transformers import CLIPModel, CLIPProcessor

    from carlos_audit.models.tiny import ensure_tiny_hf_clip

    if model == TINY_HF_CLIP:
        folder = ensure_tiny_hf_clip()
    else:
        ref = model[len(HF_EMBEDDER_PREFIX):]
        folder = hf_local_folder(ref, base_dir)
        if folder is None:
            if ref.count("/") != 1 or ref.startswith((".", "/")):
                raise AuditError(f"embedder {model!r}: no such folder, and not a hub id (org/name)")
            folder = hf_snapshot(ref, allow_download, what="embedder")
    try:
        m = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=not allow_unsafe_pickle).eval().to(device)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        hint = "" if allow_unsafe_pickle else " (safetensors weights only unless --allow-unsafe-pickle)"
        raise AuditError(f"cannot load embedder {model}{hint}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    return LoadedEmbedder(m, processor, processor.tokenizer, hf_embedder_identity(model, base_dir), tree_sha256(folder),
                          int(m.config.projection_dim), device, repr(processor.image_processor.to_dict()), "hf-transformers")


def hf_snapshot(repo_id: str, allow_download: bool, what: str) -> Path:
    """A hub repository's snapshot folder: the local Hugging Face cache only unless ``allow_download``."""
    import os

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception as e:
        hint = "" if allow_download else " (only the local Hugging Face cache is searched; pass --allow-download to fetch it)"
        raise AuditError(f"{what} {repo_id!r} is not available locally{hint}: {type(e).__name__}") from None
