"""Z-Image base models (Tongyi-MAI Z-Image-Turbo and Z-Image Base): the embedded tiny Z-Image
pipeline, its Qwen tokenizer built from code, and the variant of a diffusers Z-Image folder.

``embedded:tiny-zimage`` is a ``ZImagePipeline`` of the real classes (ZImageTransformer2DModel,
the single-stream DiT with its noise and context refiners; AutoencoderKL with the 16 latent
channels and scaling/shift factors Z-Image shares with FLUX.1; a transformers ``Qwen3Model`` text
encoder whose second-to-last hidden state is the caption feature, as Z-Image's Qwen3-4B; a
byte-level BPE ``Qwen2Tokenizer`` with Qwen's chat template; FlowMatchEulerDiscreteScheduler
with Turbo's static shift 3.0), random init with fixed seeds, written once with
``save_pretrained`` and loaded back with ``from_pretrained`` like the tiny SD and Flux.

Turbo and Base share the transformer, VAE and text-encoder configs; they differ in the
scheduler's shift (3.0 for Turbo, 6.0 for Base: each checkpoint's
``scheduler/scheduler_config.json``), which is how a folder's variant is told.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_ZIMAGE_VERSION = 1
TINY_ZIMAGE = "embedded:tiny-zimage"
SEED = 0

#: The tiny transformer's config (width 32, two heads of 16 = 4 + 6 + 6 RoPE axes; two main
#: layers, one noise and one context refiner; caption features 32 wide).
TINY_ZIMAGE_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                               n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                               cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6],
                               axes_lens=[512, 64, 64])
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen3's chat template, reduced to what Z-Image's ``_encode_prompt`` uses (one user turn, the
#: generation prompt; ``enable_thinking=True`` adds no empty think block, as in Qwen3's own).
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                      "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                      "{% endif %}{% endif %}")
#: scheduler shift per variant (the checkpoints' scheduler configs)
SHIFT_VARIANTS = {3.0: "zimage-turbo", 6.0: "zimage-base"}


def qwen_byte_vocab() -> dict[str, int]:
    """Qwen's byte-level alphabet (GPT-2's bytes-to-unicode table), one token per byte, no merges."""
    from tokenizers import pre_tokenizers

    return {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def write_qwen_tokenizer(dest: Path) -> None:
    """A Qwen2Tokenizer built from code (byte-level BPE, Qwen's special tokens and chat
    template), saved with ``save_pretrained``; no download."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=qwen_byte_vocab(), merges=[], additional_special_tokens=list(QWEN_SPECIALS[1:]),
                         model_max_length=32768)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(dest)


def _build_tiny_zimage(dest: Path) -> None:
    import shutil

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    write_qwen_tokenizer(dest / "_tok")
    tokenizer = Qwen2Tokenizer.from_pretrained(dest / "_tok")
    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(**TINY_ZIMAGE_TRANSFORMER)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=16, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    torch.manual_seed(SEED)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                                          tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=scheduler)
    pipe.save_pretrained(dest, safe_serialization=True)
    shutil.rmtree(dest / "_tok")


def ensure_tiny_zimage(home: Path | None = None) -> Path:
    from carlos_audit.models.tiny import build_into
    from carlos_audit.paths import carlos_home

    home = home or carlos_home()
    return build_into(home / "models" / f"tiny-zimage-v{TINY_ZIMAGE_VERSION}", _build_tiny_zimage)


def folder_zimage_variant(folder: Path) -> str | None:
    """"zimage-turbo" / "zimage-base" for a diffusers ZImagePipeline folder (its scheduler's
    shift), else None. A shift of neither value is Turbo's family with an unknown schedule: None."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text("utf-8"))
        if index.get("_class_name") != "ZImagePipeline":
            return None
        cfg = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return SHIFT_VARIANTS.get(float(cfg.get("shift", 1.0)))
