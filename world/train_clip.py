"""Train the world's small CLIP (transformers CLIPModel, image and text towers) from scratch.

Trained on every designer's training works (held-out concepts and held-out works never seen). Half the captions
name the concept only ("a cat face emoji"), half the concept and the designer's style ("... in twemoji style"),
so the embedding carries both what is drawn and whose hand drew it. Contrastive loss with every same-caption pair
in a batch counted as a positive.

Writes carlos_audit/models/world/clip (CLIPModel + CLIPTokenizer + CLIPImageProcessor, save_pretrained) and its training record
carlos_audit/models/world/clip/training_record.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
from data import caption


def make_model(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=common.CONTEXT, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=eos)
    vision = dict(image_size=32, patch_size=4, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_channels=3)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)
    return CLIPModel(cfg)


def to_pixels(u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(common.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 pixels (padding with the normalised white)."""
    n = x.shape[0]
    white = ((1 - torch.tensor(common.CLIP_MEAN)) / torch.tensor(common.CLIP_STD)).view(1, 3, 1, 1)
    pad = white.expand(n, 3, 36, 36).clone()
    pad[:, :, 2:34, 2:34] = x
    dx = torch.randint(0, 5, (n,), generator=g)
    dy = torch.randint(0, 5, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-time budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--out", default=str(common.MODELS / "clip"))
    ap.add_argument("--checkpoint-minutes", type=float, default=4.0)
    ap.add_argument("--resume", action="store_true", help="continue from the model in --out")
    ap.add_argument("--freeze-text", action="store_true",
                    help="train the image tower (and projections) only: the text tower is then the UNet's encoder")
    a = ap.parse_args()
    common.threads()
    common.seed_all(a.seed)
    from pathlib import Path
    from transformers import CLIPImageProcessor

    out = Path(a.out)
    split, arrays = common.load_data()
    names = [c["name"] for c in split["concepts"]]
    if a.resume:
        from transformers import CLIPModel, CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(out)
        model = CLIPModel.from_pretrained(out)
    else:
        tok = common.build_tokenizer(common.captions_for(split), out)
    n_checked = common.check_tokenizer(tok, common.captions_for(split))
    voc = tok.get_vocab()
    if not a.resume:
        model = make_model(len(voc), voc["<|startoftext|>"], voc["<|endoftext|>"])
    if a.freeze_text:
        model.text_model.requires_grad_(False)
    text_sha = common.sha_file(out / "model.safetensors") if a.resume else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIP {n_params / 1e6:.2f}M parameters, vocabulary {len(voc)}", flush=True)

    # training items: (designer, concept index)
    designers = list(split["designers"])
    items = [(d, i) for d in designers for i in split["train"][d]]
    pix = {d: to_pixels(arrays[d]) for d in designers}
    cap_ids = {}
    all_caps = []
    for i, n in enumerate(names):
        for d in [None] + designers:
            cap_ids[(i, d)] = len(all_caps)
            all_caps.append(caption(n, d))
    enc = tok(all_caps, padding="max_length", max_length=common.CONTEXT, truncation=True, return_tensors="pt")
    ids_all = enc["input_ids"]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = 100
    g = torch.Generator().manual_seed(a.seed)
    rec = common.Record(out / ("training_record_continued.json" if a.resume else "training_record.json"),
                        resumed_from_sha256=text_sha, model="transformers CLIPModel", parameters=n_params,
                        vocabulary=len(voc), tokenizer_checked_texts=n_checked, data=common.data_hashes(split),
                        training_items=len(items), args=vars(a),
                        objective="contrastive, same-caption pairs positive; captions half plain, half with style")
    t0 = time.time()
    last_ck = t0
    step = 0
    model.train()
    if a.freeze_text:
        model.text_model.eval()
    losses = []
    while step < a.max_steps and time.time() - t0 < a.minutes * 60:
        pick = torch.randint(0, len(items), (a.batch,), generator=g).tolist()
        styled = torch.rand(a.batch, generator=g) < 0.5
        x = torch.stack([pix[items[k][0]][items[k][1]] for k in pick])
        x = augment(x, g)
        cids = [cap_ids[(items[k][1], items[k][0] if s else None)] for k, s in zip(pick, styled.tolist())]
        ids = ids_all[cids]
        for pg in opt.param_groups:
            pg["lr"] = a.lr * min(1.0, (step + 1) / warm)
        o = model(input_ids=ids, pixel_values=x, return_loss=False)
        logits = o.logits_per_image  # B x B
        c = torch.tensor(cids)
        # positives: same caption text; an unstyled caption also fits every image of its concept
        concept = torch.tensor([items[k][1] for k in pick])
        same = (c[:, None] == c[None, :]) | ((concept[:, None] == concept[None, :]) & ~styled[None, :])
        tgt = same.float() / same.float().sum(1, keepdim=True)
        tgt_t = same.t().float() / same.t().float().sum(1, keepdim=True)
        loss = 0.5 * (-(tgt * F.log_softmax(logits, 1)).sum(1).mean()
                      - (tgt_t * F.log_softmax(logits.t(), 1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            rec.log(step=step, loss=round(float(np.mean(losses[-25:])), 4), logit_scale=round(model.logit_scale.exp().item(), 2))
        if time.time() - last_ck > a.checkpoint_minutes * 60:
            save(model, out, rec, step, losses)
            last_ck = time.time()
    save(model, out, rec, step, losses)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(common.CLIP_MEAN),
                       image_std=list(common.CLIP_STD), do_convert_rgb=True,
                       resample=3).save_pretrained(out)
    print(f"done: {step} steps in {time.time() - t0:.0f} s, final loss {np.mean(losses[-25:]):.4f}")


def save(model, out, rec, step, losses):
    model.save_pretrained(out)
    rec.save(steps=step, final_loss=round(float(np.mean(losses[-25:])), 4) if losses else None,
             weights_sha256=common.sha_file(out / "model.safetensors"))


if __name__ == "__main__":
    main()
