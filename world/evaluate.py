"""Print the issue-30 quality gates of the world that can be measured from its models alone.

* CLIP: top-5 naming rate among all concept names (training works, held-out works, held-out concepts); held-out
  concepts placed in their subcategory (the top-1 name's subcategory); designer probe accuracy (a logistic
  regression on CLIP image embeddings, trained on training works, tested on held-out works and concepts).
* VAE: PSNR of reconstructions (posterior mean) of held-out images, per designer.
* Base model: images of training concepts (DDIM, classifier-free guidance) named top-5 by the CLIP; a 32-image
  sample grid (world/eval/base_grid.png, the real works of the same concepts in base_grid_real.png).

Writes world/eval/evaluation.json. Gates (issue 30): CLIP top-5 >= 0.5, designer probe >= 0.9, base top-5 >= 0.5.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
from data import caption

EVAL = common.HERE / "eval"


def clip_embed_images(clip, u8: np.ndarray) -> torch.Tensor:
    from train_clip import to_pixels

    with torch.no_grad():
        out = [clip.get_image_features(pixel_values=to_pixels(u8[i:i + 256])) for i in range(0, len(u8), 256)]
    out = [o.pooler_output if hasattr(o, "pooler_output") else o for o in out]
    return F.normalize(torch.cat(out), dim=-1)


def clip_pooled_images(clip, u8: np.ndarray) -> torch.Tensor:
    """The image tower's pooled output before the projection (a richer feature for the designer probe)."""
    from train_clip import to_pixels

    with torch.no_grad():
        return torch.cat([clip.vision_model(pixel_values=to_pixels(u8[i:i + 256])).pooler_output
                          for i in range(0, len(u8), 256)])


def clip_embed_texts(clip, tok, texts: list[str]) -> torch.Tensor:
    ids = tok(texts, padding="max_length", max_length=common.CONTEXT, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        o = clip.get_text_features(input_ids=ids)
    o = o.pooler_output if hasattr(o, "pooler_output") else o
    return F.normalize(o, dim=-1)


def topk_rate(img: torch.Tensor, txt: torch.Tensor, truth: list[int], k: int = 5) -> float:
    top = (img @ txt.T).topk(k, dim=1).indices
    return float(np.mean([t in row for t, row in zip(truth, top.tolist())]))


def probe(train_x, train_y, tests: dict, n_classes: int, seed: int = 0) -> dict:
    """Multinomial logistic regression (L2), full-batch L-BFGS."""
    torch.manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    lin = torch.nn.Linear(train_x.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    xs, ys = (train_x - mu) / sd, torch.tensor(train_y)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), ys) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {name: float((lin((x - mu) / sd).argmax(1) == torch.tensor(y)).float().mean()) for name, (x, y) in tests.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def grid(images: list[np.ndarray], path: Path, cols: int = 8, scale: int = 4) -> None:
    s = images[0].shape[0] * scale
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * s, rows * s), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(im).resize((s, s), Image.Resampling.NEAREST), (c * s, r * s))
    ImageDraw.Draw(canvas)
    canvas.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default=str(common.MODELS / "clip"))
    ap.add_argument("--vae", default=str(common.MODELS / "vae"))
    ap.add_argument("--pipeline", default=str(common.MODELS / "pipeline"))
    ap.add_argument("--n-generate", type=int, default=64, help="base-model images scored by the CLIP")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(EVAL))
    ap.add_argument("--skip-base", action="store_true")
    a = ap.parse_args()
    common.threads()
    from transformers import CLIPModel, CLIPTokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    split, arrays = common.load_data()
    concepts = split["concepts"]
    names = [c["name"] for c in concepts]
    subs = [c["subcategory"] for c in concepts]
    designers = list(split["designers"])
    held_c = split["held_out_concepts"]
    res: dict = {"n_concepts": len(names), "chance_top5": round(5 / len(names), 4)}

    clip = CLIPModel.from_pretrained(a.clip).eval()
    tok = CLIPTokenizer.from_pretrained(a.clip)
    txt = clip_embed_texts(clip, tok, [caption(n, None) for n in names])
    emb = {d: clip_embed_images(clip, arrays[d]) for d in designers}

    naming = {}
    for d in designers:
        for part, idx in (("train", split["train"][d]), ("held_out_works", split["held_out_works"][d]),
                          ("held_out_concepts", held_c)):
            naming.setdefault(part, {})[d] = round(topk_rate(emb[d][idx], txt, idx), 4)
    for part in naming:
        naming[part]["all"] = round(float(np.mean(list(naming[part].values()))), 4)
    res["clip_top5_naming"] = naming

    # held-out concepts: subcategory of the top-1 name (a held-out concept's own name counts too)
    sub_hits, chance = [], []
    for d in designers:
        top1 = (emb[d][held_c] @ txt.T).argmax(1).tolist()
        sub_hits += [subs[p] == subs[t] for p, t in zip(top1, held_c)]
    chance = float(np.mean([np.mean([s == subs[t] for s in subs]) for t in held_c]))
    res["held_out_concepts_subcategory"] = {"rate": round(float(np.mean(sub_hits)), 4), "chance": round(chance, 4)}

    # designer probe on CLIP image embeddings (final, projected)
    def xy(part, feats=emb):
        xs, ys = [], []
        for j, d in enumerate(designers):
            idx = split[part][d] if part != "held_out_concepts" else held_c
            xs.append(feats[d][idx])
            ys += [j] * len(idx)
        return torch.cat(xs), ys

    tr = xy("train")
    res["designer_probe"] = {k: round(v, 4) for k, v in probe(*tr, {"held_out_works": xy("held_out_works"),
                                                                    "held_out_concepts": xy("held_out_concepts")},
                                                              len(designers)).items()}
    res["designer_probe"]["chance"] = round(1 / len(designers), 4)
    res["designer_probe"]["designers"] = designers
    pooled = {d: clip_pooled_images(clip, arrays[d]) for d in designers}
    res["designer_probe_pooled_features"] = {k: round(v, 4) for k, v in probe(
        *xy("train", pooled), {"held_out_works": xy("held_out_works", pooled),
                               "held_out_concepts": xy("held_out_concepts", pooled)}, len(designers)).items()}
    # pairwise: Noto against each other designer (the base's house style against a LoRA's)
    pair = {}
    for j, d in enumerate(designers[1:], start=1):
        keep = lambda x, y: (x[[k for k, t in enumerate(y) if t in (0, j)]], [0 if t == 0 else 1 for t in y if t in (0, j)])
        pair[f"noto_vs_{d}"] = round(probe(*keep(*tr), {"h": keep(*xy("held_out_works"))}, 2)["h"], 4)
    res["designer_probe_pairwise_held_out_works"] = pair
    # zero-shot style: which style caption of the right concept fits best
    zs = []
    for j, d in enumerate(designers):
        idx = split["held_out_works"][d]
        for i in idx:
            t = clip_embed_texts(clip, tok, [caption(names[i], e) for e in designers])
            zs.append(int((emb[d][i] @ t.T).argmax()) == j)
    res["designer_zero_shot_held_out_works"] = round(float(np.mean(zs)), 4)

    # VAE
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(a.vae).eval()
    vres = {}
    with torch.no_grad():
        for d in designers:
            idx = sorted(set(split["held_out_works"][d]) | set(held_c))
            x = torch.from_numpy(arrays[d][idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
            vres[d] = round(psnr(vae.decode(vae.encode(x).latent_dist.mean).sample, x), 2)
    res["vae_psnr_held_out"] = vres
    rows = []
    with torch.no_grad():
        for d in designers:
            idx = split["held_out_works"][d][:8]
            x = torch.from_numpy(arrays[d][idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = ((vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
            rows += list(arrays[d][idx]) + list(y.permute(0, 2, 3, 1).numpy())
    grid(rows, out / "vae_grid.png")  # per designer: a row of held-out works, then their reconstructions

    if not a.skip_base and (Path(a.pipeline) / "model_index.json").exists():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(a.pipeline)
        pipe.set_progress_bar_config(disable=True)
        clip_text = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
        te = pipe.text_encoder.state_dict()
        res["pipeline_text_encoder_is_clip_text_tower"] = all(
            torch.equal(te[k], clip_text[k]) for k in te if k in clip_text) and len(set(te) & set(clip_text)) == len(te)
        base_d = json.loads((Path(a.pipeline) / "training_record.json").read_text()).get("base_designer", "noto")
        train_idx = split["train"][base_d]
        rng = np.random.default_rng(a.seed)
        pick = sorted(rng.choice(train_idx, size=min(a.n_generate, len(train_idx)), replace=False).tolist())
        imgs = []
        for s in range(0, len(pick), 16):
            chunk = pick[s:s + 16]
            gens = [torch.Generator().manual_seed(a.seed * 100000 + i) for i in chunk]
            imgs += pipe([caption(names[i], None) for i in chunk], num_inference_steps=a.steps, guidance_scale=a.cfg,
                         generator=gens, output_type="np").images.tolist()
        gen = (np.clip(np.array(imgs), 0, 1) * 255).round().astype(np.uint8)
        e = clip_embed_images(clip, gen)
        real = emb[base_d][pick]
        res["base_model"] = {
            "designer": base_d, "n_images": len(pick), "steps": a.steps, "cfg": a.cfg,
            "clip_top5_naming": round(topk_rate(e, txt, pick), 4),
            "clip_top5_naming_real_works_same_concepts": round(topk_rate(real, txt, pick), 4),
            "clip_cosine_to_own_real_work": round(float((e * real).sum(1).mean()), 4),
            "pipeline_record_steps": json.loads((Path(a.pipeline) / "training_record.json").read_text()).get("steps"),
        }
        grid([g for g in gen[:32]], out / "base_grid.png")
        grid([arrays[base_d][i] for i in pick[:32]], out / "base_grid_real.png")
        (out / "base_grid.txt").write_text("".join(f"{k:2d} {names[i]}\n" for k, i in enumerate(pick[:32])))
    res["wall_s"] = round(time.time() - t0, 1)
    (out / "evaluation.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
