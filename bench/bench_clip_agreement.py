"""How far open_clip ViT-B-32 and transformers CLIP disagree on the same weights and images.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_clip_agreement.py [--images 16] [--seed 0]

Random ViT-B/32 weights (open_clip ``ViT-B-32-quickgelu``, the openai architecture) are converted
one way into a transformers ``CLIPModel`` (the CARLoS reference's class). Images are 1024x1024
(SDXL's size), smooth random fields plus noise. Printed:

1. model only: the same pixel tensor into both towers (open_clip ``encode_image`` vs
   ``get_image_features``) and the same token ids into both text towers;
2. preprocessing too: each library's own preprocessing of the same PIL images (open_clip's
   torchvision transform vs ``CLIPImageProcessor`` with the openai settings);
3. the effect on CARLoS quantities: per-pair diff vectors (image i+1 minus image i) and the
   strength and consistency computed from them with each library.

Relative errors are ||a - b|| / ||b|| per feature vector (max over images).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def convert_open_clip_to_hf(oc_model):
    """A transformers CLIPModel holding an open_clip (openai-architecture) model's weights."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    sd = oc_model.state_dict()
    v_width = sd["visual.conv1.weight"].shape[0]
    t_width = sd["token_embedding.weight"].shape[1]
    n_v = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    n_t = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    cfg = CLIPConfig(
        text_config=dict(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width, intermediate_size=4 * t_width,
                         num_hidden_layers=n_t, num_attention_heads=t_width // 64, max_position_embeddings=77,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=n_v,
                           num_attention_heads=v_width // 64, image_size=224, patch_size=sd["visual.conv1.weight"].shape[-1],
                           hidden_act="quick_gelu"),
        projection_dim=sd["visual.proj"].shape[1])
    hf = CLIPModel(cfg).eval()
    out = {}

    def block(src, dst):
        q, k, v = sd[f"{src}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[f"{src}.attn.in_proj_bias"].chunk(3)
        out.update({f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.k_proj.weight": k, f"{dst}.self_attn.v_proj.weight": v,
                    f"{dst}.self_attn.q_proj.bias": qb, f"{dst}.self_attn.k_proj.bias": kb, f"{dst}.self_attn.v_proj.bias": vb})
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]

    for i in range(n_v):
        block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    for i in range(n_t):
        block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    out.update({
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"], "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"], "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T.contiguous(), "logit_scale": sd["logit_scale"],
    })
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        hf.eval()
    return hf


def images(n: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((1024, 1024), Image.BICUBIC)
        px = np.asarray(small, dtype=np.float32) + rng.normal(0, 12, (1024, 1024, 3))
        out.append(Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)))
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import open_clip
    import torch
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from carlos_audit.analysis.metrics import consistency, strength
    from carlos_audit.models.tiny import write_clip_tokenizer

    torch.manual_seed(args.seed)
    oc, _, oc_pre = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    oc.eval()
    hf = convert_open_clip_to_hf(oc)
    ims = images(args.images, args.seed)
    # the openai preprocessing, as openai/clip-vit-base-patch32's preprocessor_config.json sets it
    hf_pre = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        x_oc = torch.stack([oc_pre(im) for im in ims])
        x_hf = hf_pre(images=ims, return_tensors="pt")["pixel_values"]
        same_oc = oc.encode_image(x_hf).numpy()
        same_hf = hf.get_image_features(pixel_values=x_hf).pooler_output.numpy()
        own_oc = oc.encode_image(x_oc).numpy()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        write_clip_tokenizer(Path(td))
        tok = CLIPTokenizer.from_pretrained(td)
    texts = ["a watercolor painting of a fox", "a cinematic close-up of a man with a rugged beard, dramatic shadows"]
    with torch.no_grad():
        ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        t_hf = hf.get_text_features(input_ids=ids).pooler_output.numpy()
        t_oc = oc.encode_text(ids).numpy()
    d_oc, d_hf = np.diff(own_oc.astype(np.float64), axis=0), np.diff(same_hf.astype(np.float64), axis=0)
    result = {
        "weights": "random ViT-B-32-quickgelu (open_clip) converted to transformers CLIPModel",
        "images": f"{args.images} x 1024x1024 RGB (smooth random fields + noise), seed {args.seed}",
        "model_only_image_max_rel": rel(same_oc, same_hf),
        "model_only_image_max_abs": float(np.abs(same_oc - same_hf).max()),
        "model_only_text_max_rel": rel(t_oc, t_hf),
        "pixels_max_abs_diff": float((x_oc - x_hf).abs().max()),
        "pixels_mean_abs_diff": float((x_oc - x_hf).abs().mean()),
        "with_preprocessing_image_max_rel": rel(own_oc, same_hf),
        "with_preprocessing_min_cosine": float(min(a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(own_oc, same_hf))),
        "diff_vectors_max_rel": rel(d_oc, d_hf),
        "strength": {"open_clip": strength(d_oc), "transformers": strength(d_hf)},
        "consistency": {"open_clip": consistency(d_oc), "transformers": consistency(d_hf)},
        "float32_eps": float(np.finfo(np.float32).eps),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
