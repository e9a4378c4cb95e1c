"""Train the world's small VAE (diffusers AutoencoderKL) from scratch on every designer's training works.

32x32 RGB images -> 8x8x8 latents. Loss: L1 + MSE on the reconstruction from a sampled latent, plus a small KL
term. Writes carlos_audit/models/world/vae (save_pretrained, with the latents' scaling_factor measured on the training set) and
its training record.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common


def make_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=8,
                         norm_num_groups=16, sample_size=32)


def to_x(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--out", default=str(common.MODELS / "vae"))
    ap.add_argument("--checkpoint-minutes", type=float, default=4.0)
    a = ap.parse_args()
    common.threads()
    common.seed_all(a.seed)
    out = Path(a.out)
    split, arrays = common.load_data()
    designers = list(split["designers"])
    train = torch.cat([to_x(arrays[d][split["train"][d]]) for d in designers])
    held = torch.cat([to_x(arrays[d][split["held_out_works"][d]]) for d in designers]
                     + [to_x(arrays[d][split["held_out_concepts"]]) for d in designers])
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VAE {n_params / 1e6:.2f}M parameters; {len(train)} training images", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    rec = common.Record(out / "training_record.json", model="diffusers AutoencoderKL", parameters=n_params,
                        data=common.data_hashes(split), training_images=len(train), args=vars(a),
                        objective="L1 + MSE of the decoded sampled latent + kl * KL")
    t0 = time.time()
    last_ck = t0
    step = 0
    losses = []
    model.train()
    while step < a.max_steps and time.time() - t0 < a.minutes * 60:
        x = train[torch.randint(0, len(train), (a.batch,), generator=g)]
        post = model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        y = model.decode(z).sample
        kl = post.kl().mean() / (32 * 32 * 3)
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + a.kl * kl
        lr = a.lr * min(1.0, (step + 1) / 50)
        frac = (time.time() - t0) / (a.minutes * 60)
        if frac > 0.7:  # anneal the last 30% of the time budget
            lr *= max(0.05, 1 - (frac - 0.7) / 0.3)
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            rec.log(step=step, loss=round(float(np.mean(losses[-50:])), 4), kl=round(kl.item(), 3), lr=round(lr, 6))
        if time.time() - last_ck > a.checkpoint_minutes * 60:
            save(model, out, rec, step, losses, train, held)
            last_ck = time.time()
    save(model, out, rec, step, losses, train, held)
    print(f"done: {step} steps in {time.time() - t0:.0f} s")


@torch.no_grad()
def evaluate(model, train, held):
    model.eval()
    res = {}
    for name, x in (("train", train[::8]), ("held_out", held[::2])):
        post = model.encode(x).latent_dist
        res[f"psnr_{name}_mean"] = round(psnr(model.decode(post.mean).sample, x), 2)
        res[f"psnr_{name}_sample"] = round(psnr(model.decode(post.sample()).sample, x), 2)
    z = model.encode(train[::4]).latent_dist.mean
    res["latent_std"] = round(z.std().item(), 4)
    model.train()
    return res, 1.0 / z.std().item()


def save(model, out, rec, step, losses, train, held):
    res, scale = evaluate(model, train, held)
    model.register_to_config(scaling_factor=round(scale, 5))
    model.save_pretrained(out)
    rec.log(step=step, **res)
    rec.save(steps=step, final_loss=round(float(np.mean(losses[-50:])), 4) if losses else None, eval=res,
             scaling_factor=round(scale, 5), weights_sha256=common.sha_file(out / "diffusion_pytorch_model.safetensors"))


if __name__ == "__main__":
    main()
