"""FLUX.1 base models: the embedded tiny Flux pipeline, the T5 tokenizer built from code, and
single-file transformer checkpoints (``flux1-dev.safetensors`` in Black Forest Labs' layout).

``embedded:tiny-flux`` is a ``FluxPipeline`` of the real classes (FluxTransformer2DModel with a
guidance embedder, as FLUX.1-dev has; AutoencoderKL with Flux's 16 latent channels and its
scaling/shift factors; CLIPTextModel + CLIPTokenizer; T5EncoderModel + T5TokenizerFast;
FlowMatchEulerDiscreteScheduler), random init with fixed seeds, written once with
``save_pretrained`` and loaded back with ``from_pretrained`` like the tiny SD.

A single-file checkpoint holds only the transformer: it is loaded with
``FluxTransformer2DModel.from_single_file`` and the carried FLUX.1-dev or -schnell transformer
config (chosen by whether the file has the guidance embedder, ``guidance_in.*``); the VAE and
the two text encoders come from ``[base_model] config`` (a diffusers FLUX.1 folder or a hub id in
the local cache). float8-stored checkpoints are upcast to the case's dtype; the stored dtypes are
recorded.
"""

from __future__ import annotations

import json
from pathlib import Path


TINY_FLUX_VERSION = 1
TINY_FLUX = "embedded:tiny-flux"
SEED = 0

#: The tiny transformer's config (inner dim 32; one double and one single block).
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
T5_MAX_LENGTH = 512


def t5_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary for the tiny T5 tokenizer: T5's special tokens first (pad 0,
    eos 1, unk 2, as in T5), then the SentencePiece word-start marker, letters, digits and
    punctuation, with and without the marker."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += list("0123456789.,;:!?'\"-()/&+<>_")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{c}", -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return pieces


def write_t5_tokenizer(dest: Path) -> None:
    """A T5TokenizerFast built from code (tokenizers Unigram + Metaspace, as T5's own
    tokenizer.json is), saved with ``save_pretrained``; no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(t5_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, additional_special_tokens=[], model_max_length=T5_MAX_LENGTH)
    fast.save_pretrained(dest)


def _build_tiny_flux(dest: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from carlos_audit.models.tiny import write_clip_tokenizer

    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=16, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=32))
    torch.manual_seed(SEED)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab()), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    write_clip_tokenizer(dest / "_tok")
    write_t5_tokenizer(dest / "_tok2")
    pipe = FluxPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder,
                        tokenizer=CLIPTokenizer.from_pretrained(dest / "_tok"), text_encoder_2=t5,
                        tokenizer_2=T5TokenizerFast.from_pretrained(dest / "_tok2"), scheduler=scheduler)
    pipe.save_pretrained(dest, safe_serialization=True)
    import shutil

    shutil.rmtree(dest / "_tok")
    shutil.rmtree(dest / "_tok2")


def ensure_tiny_flux(home: Path | None = None) -> Path:
    from carlos_audit.models.tiny import build_into
    from carlos_audit.paths import carlos_home

    home = home or carlos_home()
    return build_into(home / "models" / f"tiny-flux-v{TINY_FLUX_VERSION}", _build_tiny_flux)


# ----------------------------------------------------------------------------- single-file transformers

#: Tensor names that mark a Black Forest Labs transformer checkpoint, and the guidance embedder
#: that only FLUX.1-dev has (schnell is guidance-distilled without it).
BFL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
BFL_PREFIXES = ("", "model.diffusion_model.")
BFL_GUIDANCE = "guidance_in.in_layer.weight"


def single_file_flux_variant(path: Path) -> tuple[str | None, list[str]]:
    """("flux-dev" | "flux-schnell" | None, sorted stored dtypes) of a safetensors checkpoint, from
    its header alone."""
    from carlos_audit.lora.fileformat import read_header

    header, _, _ = read_header(path)
    keys = set(header) - {"__metadata__"}
    for prefix in BFL_PREFIXES:
        if all(prefix + m in keys for m in BFL_MARKERS):
            variant = "flux-dev" if prefix + BFL_GUIDANCE in keys else "flux-schnell"
            return variant, sorted({header[k]["dtype"] for k in keys})
    return None, []


def load_single_file_flux(path: Path, config_dir: Path, components_dir: Path, torch_dtype):
    """FluxPipeline from a transformer checkpoint: the transformer with the carried config
    (``config_dir``; float8 tensors upcast to ``torch_dtype``), everything else from
    ``components_dir``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_single_file(str(path), config=str(config_dir), subfolder="transformer",
                                                          local_files_only=True, torch_dtype=torch_dtype)
    return FluxPipeline.from_pretrained(components_dir, transformer=transformer, local_files_only=True,
                                        use_safetensors=True, dtype=torch_dtype)


def folder_flux_variant(folder: Path) -> str | None:
    """"flux-dev" / "flux-schnell" for a diffusers FluxPipeline folder (transformer config), else None."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text("utf-8"))
        if index.get("_class_name") != "FluxPipeline":
            return None
        cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"
