"""What the tool decides where a library would leave a default that changes bits: the SDXL
invisible watermark (diffusers turns it on whenever the optional ``invisible-watermark`` package
is installed), the embedder's image preprocessing backend and dtype (transformers 5 defaults to
the torchvision processor, and to the checkpoint's dtype), and whether open_clip weights named
by tag are in the local cache. models/loading.py applies them; each choice is recorded.
"""

from __future__ import annotations

#: The pinned defaults of an embedder: PIL image preprocessing (the reference's transformers 4
#: CLIPProcessor; transformers 5 defaults to the torchvision one, up to 0.015 apart per
#: normalised pixel) and float32 weights whatever the checkpoint holds. Another choice is part
#: of the identity ("...@torchvision/float16"), so it can never pass for the defaults.
EMBEDDER_DEFAULTS = ("pil", "float32")


def pinned_identity(identity: str, preprocess: str, dtype: str) -> str:
    return identity if (preprocess, dtype) == EMBEDDER_DEFAULTS else f"{identity}@{preprocess}/{dtype}"


def watermark_record(pipe, requested: bool) -> dict:
    """Whether the pipeline watermarks its images (diffusers' SDXL ``watermark``), as decided."""
    import importlib.metadata as md

    try:
        package = md.version("invisible-watermark")
    except md.PackageNotFoundError:
        package = None
    return {"requested": bool(requested), "applied": getattr(pipe, "watermark", None) is not None,
            "invisible_watermark": package}


def watermark_kwargs(cls, requested: bool) -> dict:
    """``add_watermarker`` for pipeline classes whose constructor takes it."""
    import inspect

    return {"add_watermarker": bool(requested)} if "add_watermarker" in inspect.signature(cls.__init__).parameters else {}


def open_clip_cached(model: str, pretrained: str) -> bool:
    """True when open_clip would find the tagged weights without the network."""
    try:
        import open_clip

        from carlos_audit.models.hub import cached_snapshot

        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        hub = cfg.get("hf_hub", "")
        if not hub:
            return False
        repo = hub.rstrip("/")
        for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if cached_snapshot(repo, (fn,)) is not None:
                return True
    except Exception:
        return False
    return False
