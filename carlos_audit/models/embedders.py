"""Embedders: open_clip models (the embedded tiny CLIP, named weights, checkpoint files) and
transformers CLIP (``hf:<hub id>|<folder>``, the reference's embedder), each with its
preprocessing backend and dtype pinned (models/pinned.py) and its weights hashed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.lora.fileformat import PICKLE_EXTENSIONS
from carlos_audit.models.filehash import file_sha256
from carlos_audit.models.hub import hf_snapshot
from carlos_audit.models.pinned import open_clip_cached, pinned_identity
from carlos_audit.models.tiny import ensure_tiny_clip
from carlos_audit.models.world_registry import WORLD_CLIP, world_model_dir
from carlos_audit.hashing import tree_sha256


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


@dataclass(frozen=True)
class EmbedderLoad:
    """How ``load_embedder`` loads: the device, hub downloads and pickle checkpoints allowed, the
    folder a relative checkpoint path is resolved against, the preprocessing backend and dtype
    (pinned: ``EMBEDDER_DEFAULTS``)."""

    device: str = "cpu"
    allow_download: bool = False
    allow_unsafe_pickle: bool = False
    base_dir: Path | None = None
    preprocess: str = "pil"
    dtype: str = "float32"


def load_embedder(model: str, pretrained: str | None, **options) -> LoadedEmbedder:
    """An embedder with its preprocessing backend and dtype pinned (``EMBEDDER_DEFAULTS``);
    ``options``: the fields of ``EmbedderLoad``."""
    how = EmbedderLoad(**options)
    device, dtype, preprocess = how.device, how.dtype, how.preprocess
    allow_download, allow_unsafe_pickle, base_dir = how.allow_download, how.allow_unsafe_pickle, how.base_dir
    if device == "cpu" and dtype != "float32":
        raise AuditError(f"embedder dtype {dtype} is not supported on the CPU (use float32)")
    if is_hf_embedder(model):
        return load_hf_embedder(model, device=device, allow_download=allow_download,
                                allow_unsafe_pickle=allow_unsafe_pickle, base_dir=base_dir, preprocess=preprocess,
                                dtype=dtype)
    import open_clip
    import torch

    if preprocess != "pil":
        raise AuditError(f"embedder {model}: open_clip preprocesses PIL images (torchvision transforms on PIL); "
                         f"preprocess {preprocess!r} is for transformers (hf:) embedders only")

    if model == "embedded:tiny-clip":
        path = ensure_tiny_clip()
        name, pre, identity, digest = f"local-dir:{path}", None, model, tree_sha256(path, file_sha256)
    else:
        name, identity, digest, pre = model, f"open_clip:{model}/{pretrained}", None, pretrained
        if pretrained:
            pp = Path(pretrained)
            if base_dir is not None and not pp.is_absolute() and (base_dir / pp).exists():
                pp = base_dir / pp
            if pp.exists():
                if pp.suffix.lower() in PICKLE_EXTENSIONS and not allow_unsafe_pickle:
                    raise AuditError(f"embedder checkpoint {pp} is pickle-based; refused unless --allow-unsafe-pickle")
                pre, identity, digest = str(pp), f"open_clip:{model}/file:{pp.name}", file_sha256(pp)
            elif not allow_download and not open_clip_cached(model, pretrained):
                raise AuditError(
                    f"embedder weights {model}/{pretrained} are not available locally; "
                    "give a checkpoint path as `pretrained`, or pass --allow-download"
                )
    try:
        precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
        m, _, transforms = open_clip.create_model_and_transforms(name, pretrained=pre, device=device,
                                                                 precision=precision)
    except Exception as e:
        raise AuditError(f"cannot load embedder {identity}: {type(e).__name__}: {e}") from None
    m.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        dim = int(m.encode_image(torch.zeros(1, 3, *_image_size(m), device=device, dtype=getattr(torch, dtype))).shape[-1])
    return LoadedEmbedder(m, transforms, tokenizer, pinned_identity(identity, preprocess, dtype), digest, dim, device,
                          f"open_clip transforms on PIL images, {dtype}: {transforms!r}")


def _image_size(model) -> tuple[int, int]:
    size = model.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


# --------------------------------------------------------------------------- transformers CLIP (the reference's embedder)

HF_EMBEDDER_PREFIX = "hf:"
HF_IDENTITY_PREFIX = "hf-transformers:"
TINY_HF_CLIP = "embedded:tiny-hf-clip"


def is_hf_embedder(model: str) -> bool:
    return model.startswith(HF_EMBEDDER_PREFIX) or model in (TINY_HF_CLIP, WORLD_CLIP)


def hf_embedder_identity(model: str, base_dir: Path | None = None) -> str:
    """The signature identity of ``[embedder] model`` (no weights loaded): ``hf-transformers:<hub id>``
    (what the CARLoS preset records), ``hf-transformers:dir:<folder name>``, or the embedded name."""
    if model in (TINY_HF_CLIP, WORLD_CLIP):
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
                     allow_unsafe_pickle: bool = False, base_dir: Path | None = None, preprocess: str = "pil",
                     dtype: str = "float32") -> LoadedEmbedder:
    """transformers ``CLIPModel`` + ``CLIPProcessor``, as the CARLoS reference loads them: a hub id
    from the local Hugging Face cache only (unless ``allow_download``), or a local folder.
    Weights are read from safetensors files unless ``allow_unsafe_pickle``."""
    from transformers import CLIPModel, CLIPProcessor

    from carlos_audit.models.tiny import ensure_tiny_hf_clip

    if model == TINY_HF_CLIP:
        folder = ensure_tiny_hf_clip()
    elif model == WORLD_CLIP:  # the trained world's CLIP, package data (models/world_registry.py)
        folder = world_model_dir(model)
    else:
        ref = model[len(HF_EMBEDDER_PREFIX):]
        folder = hf_local_folder(ref, base_dir)
        if folder is None:
            if ref.count("/") != 1 or ref.startswith((".", "/")):
                raise AuditError(f"embedder {model!r}: no such folder, and not a hub id (org/name)")
            folder = hf_snapshot(ref, allow_download, what="embedder")
    try:
        import torch

        m = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=not allow_unsafe_pickle,
                                      dtype=getattr(torch, dtype)).eval().to(device)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True, backend=preprocess)
    except Exception as e:
        hint = "" if allow_unsafe_pickle else " (safetensors weights only unless --allow-unsafe-pickle)"
        raise AuditError(f"cannot load embedder {model}{hint}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    ip = processor.image_processor
    return LoadedEmbedder(m, processor, processor.tokenizer, pinned_identity(hf_embedder_identity(model, base_dir), preprocess, dtype),
                          tree_sha256(folder, file_sha256), int(m.config.projection_dim), device,
                          f"{type(ip).__name__} (backend {preprocess}), {dtype}: {ip.to_dict()!r}", "hf-transformers")
