"""Train the world's base UNet (diffusers UNet2DConditionModel) on one designer's set, its "house style" (Noto).

The text encoder is the world CLIP's text tower (frozen), the VAE the world VAE (frozen; latents are the posterior
means, precomputed). DDPM noise schedule as Stable Diffusion 1.x (scaled_linear 0.00085-0.012, epsilon
prediction), min-SNR-5 loss weighting, 10% caption dropout (for classifier-free guidance), EMA of the weights.
Captions: half "a NAME emoji", half "a NAME emoji in noto style".

Every --checkpoint-minutes the EMA weights are assembled with the VAE, text encoder, tokenizer and a DDIM scheduler
into a diffusers StableDiffusionPipeline saved at carlos_audit/models/world/pipeline (save_pretrained), and the full training
state goes to world/build/checkpoints/unet.pt (--resume continues from it).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from data import caption

BASE_DESIGNER = "noto"


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=8, layers_per_block=1, block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16)


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def load_text_encoder(clip_dir: Path):
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_dir)
    te = CLIPTextModel(clip.config.text_config)
    src = clip.text_model
    te.load_state_dict(src.state_dict() if isinstance(src, CLIPTextModel) else {
        k.removeprefix("text_model."): v for k, v in clip.state_dict().items() if k.startswith("text_model.")})
    te.eval().requires_grad_(False)
    return te, CLIPTokenizer.from_pretrained(clip_dir)


@torch.no_grad()
def encode_text(te, tok, texts: list[str]) -> torch.Tensor:
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return torch.cat([te(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])


def assemble(unet, vae, te, tok):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--max-steps", type=int, default=1000000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--clip", default=str(common.MODELS / "clip"))
    ap.add_argument("--vae", default=str(common.MODELS / "vae"))
    ap.add_argument("--out", default=str(common.MODELS / "pipeline"))
    ap.add_argument("--state", default=str(common.CKPT / "unet.pt"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    a = ap.parse_args()
    common.threads()
    common.seed_all(a.seed)
    from diffusers import AutoencoderKL

    out, state_path = Path(a.out), Path(a.state)
    split, arrays = common.load_data()
    names = [c["name"] for c in split["concepts"]]
    idx = split["train"][BASE_DESIGNER]
    te, tok = load_text_encoder(Path(a.clip))
    vae = AutoencoderKL.from_pretrained(a.vae).eval().requires_grad_(False)
    with torch.no_grad():
        x = torch.from_numpy(arrays[BASE_DESIGNER][idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        cond_plain = encode_text(te, tok, [caption(names[i], None) for i in idx])
        cond_style = encode_text(te, tok, [caption(names[i], BASE_DESIGNER) for i in idx])
        uncond = encode_text(te, tok, [""])[0]
    print(f"latents {tuple(lat.shape)} std {lat.std():.3f}; text states {tuple(cond_plain.shape)}", flush=True)

    unet = make_unet()
    n_params = sum(p.numel() for p in unet.parameters())
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.01)
    step, losses, prior_wall = 0, [], 0.0
    rec = common.Record(out / "training_record.json", model="diffusers UNet2DConditionModel in StableDiffusionPipeline",
                        parameters=n_params, base_designer=BASE_DESIGNER, training_images=len(idx),
                        data=common.data_hashes(split), args=vars(a),
                        clip_weights_sha256=common.sha_file(Path(a.clip) / "model.safetensors"),
                        vae_weights_sha256=common.sha_file(Path(a.vae) / "diffusion_pytorch_model.safetensors"),
                        objective="epsilon MSE, min-SNR-5 weights, 10% caption dropout, EMA")
    g = torch.Generator().manual_seed(a.seed)
    if a.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, losses, prior_wall = st["step"], st["losses"], st["wall_s"]
        g.set_state(st["gen"])
        rec.data["log"] = st["log"]
        rec.data["resumed_at_step"] = step
        print(f"resumed at step {step}", flush=True)
    print(f"UNet {n_params / 1e6:.2f}M parameters; {len(idx)} {BASE_DESIGNER} training images", flush=True)

    sched = noise_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    t0 = time.time()
    last_ck = t0
    unet.train()
    while step < a.max_steps and time.time() - t0 < a.minutes * 60:
        b = torch.randint(0, len(idx), (a.batch,), generator=g)
        z0 = lat[b]
        styled = torch.rand(a.batch, generator=g) < 0.5
        cond = torch.where(styled[:, None, None], cond_style[b], cond_plain[b])
        drop = torch.rand(a.batch, generator=g) < 0.1
        cond = torch.where(drop[:, None, None], uncond.expand_as(cond), cond)
        t = torch.randint(0, 1000, (a.batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        for pg in opt.param_groups:
            pg["lr"] = a.lr * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 50 == 0:
            rec.log(step=step, loss=round(float(np.mean(losses[-50:])), 4))
        if time.time() - last_ck > a.checkpoint_minutes * 60:
            save(a, unet, ema, opt, vae, te, tok, rec, step, losses, g, prior_wall + time.time() - t0, state_path)
            last_ck = time.time()
    save(a, unet, ema, opt, vae, te, tok, rec, step, losses, g, prior_wall + time.time() - t0, state_path)
    print(f"done: {step} steps", flush=True)


def save(a, unet, ema, opt, vae, te, tok, rec, step, losses, g, wall, state_path):
    out = Path(a.out)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "losses": losses, "gen": g.get_state(), "wall_s": wall, "log": rec.data["log"]}, tmp)
    tmp.replace(state_path)
    pipe = assemble(ema, vae, te, tok)
    pipe.save_pretrained(out)
    rec.save(steps=step, training_wall_s=round(wall, 1), final_loss=round(float(np.mean(losses[-50:])), 4),
             weights="EMA", unet_weights_sha256=common.sha_file(out / "unet" / "diffusion_pytorch_model.safetensors"))
    print(f"checkpoint at step {step}", flush=True)


if __name__ == "__main__":
    main()
