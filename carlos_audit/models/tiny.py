"""Embedded tiny models, built deterministically from code (random init, fixed seed).

``embedded:tiny-sd``   a Stable Diffusion pipeline of diffusers classes (UNet2DConditionModel,
                       AutoencoderKL, transformers CLIPTextModel + CLIPTokenizer), 64x64 images.
``embedded:tiny-clip`` an open_clip model from a custom config, saved for ``local-dir:`` loading.
``embedded:tiny-hf-clip`` a transformers CLIPModel + CLIPProcessor (the reference's embedder
                       classes), saved with ``save_pretrained``, loaded with ``from_pretrained``.

They are written once into ``$CARLOS_AUDIT_HOME/models/<name>-v<N>`` with ``save_pretrained``
(or safetensors for open_clip) and always loaded back through the real loaders, so the code
that runs on the tiny models is the code that runs on real checkpoints. A rebuild gives
byte-identical files; :func:`tree_sha256` of the folder is recorded as the model's hash.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from carlos_audit.paths import carlos_home

TINY_SD_VERSION = 1
TINY_CLIP_VERSION = 1
TINY_HF_CLIP_VERSION = 1
SEED = 0

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_into(final: Path, builder) -> Path:
    """Build into a temp folder beside ``final`` and rename: concurrent builders cannot clash."""
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        builder(tmp)
        (tmp / ".complete").write_text("built by carlos-audit\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """vocab and merges exactly as open_clip's SimpleTokenizer builds them from its BPE file."""
    import open_clip.tokenizer as oct

    bpe_path = Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, [" ".join(m) for m in merges]


def write_clip_tokenizer(dest: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    with tempfile.TemporaryDirectory() as td:
        vf, mf = Path(td) / "vocab.json", Path(td) / "merges.txt"
        vf.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        mf.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(str(vf), str(mf), model_max_length=77)
        tok.save_pretrained(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 77  # transformers 5 needs it, else OverflowError in the pipeline
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _build_tiny_sd(dest: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    # each component from the same seed, in this order: the bytes of the saved model depend on it
    unet, vae, text_encoder = _tiny_sd_unet(), _tiny_sd_vae(), _tiny_sd_text_encoder()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tok_dir = dest / "_tok"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    shutil.rmtree(tok_dir)


def _tiny_sd_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _tiny_sd_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )


def _tiny_sd_text_encoder():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )


def _build_tiny_clip(dest: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(dest / "open_clip_model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": TINY_CLIP_PREPROCESS}
    (dest / "open_clip_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def ensure_tiny_sd(home: Path | None = None) -> Path:
    home = home or carlos_home()
    return build_into(home / "models" / f"tiny-sd-v{TINY_SD_VERSION}", _build_tiny_sd)


def ensure_tiny_clip(home: Path | None = None) -> Path:
    home = home or carlos_home()
    return build_into(home / "models" / f"tiny-clip-v{TINY_CLIP_VERSION}", _build_tiny_clip)


def _build_tiny_hf_clip(dest: Path) -> None:
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    torch.manual_seed(SEED)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu")
    cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **common).to_dict(),
                     vision_config=CLIPVisionConfig(image_size=64, patch_size=8, **common).to_dict(), projection_dim=64)
    CLIPModel(cfg).eval().save_pretrained(dest, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                       image_mean=TINY_CLIP_PREPROCESS["mean"], image_std=TINY_CLIP_PREPROCESS["std"]).save_pretrained(dest)
    write_clip_tokenizer(dest)


def ensure_tiny_hf_clip(home: Path | None = None) -> Path:
    home = home or carlos_home()
    return build_into(home / "models" / f"tiny-hf-clip-v{TINY_HF_CLIP_VERSION}", _build_tiny_hf_clip)
