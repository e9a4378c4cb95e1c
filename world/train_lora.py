"""Train one LoRA on the world's base pipeline the way users train them: peft LoRA on the UNet's attention and
projection layers, saved with diffusers' own code in the diffusers/peft layout and converted to the kohya layout.

Known truth: each LoRA is trained on the works of one designer (a style LoRA) or on a handful of works (a
memorising LoRA); its record names the works (concept indices and image sha256), seed, steps, losses, wall time
and library versions. The base pipeline is frozen; only the LoRA's A/B matrices train (DDPM epsilon MSE with
min-SNR-5 weights, as the base). ``--init`` continues from a saved LoRA (a derivative: continued training).

Outputs in ``world/loras/<name>/``: ``pytorch_lora_weights.safetensors`` (StableDiffusionPipeline.save_lora_weights
of get_peft_model_state_dict, with the LoraConfig as adapter metadata), ``<name>_kohya.safetensors``
(convert_all_state_dict_to_peft + convert_state_dict_to_kohya) and ``training_record.json``. The training state
goes to ``world/build/checkpoints/lora_<name>.pt`` every ``--checkpoint-minutes`` (``--resume`` continues).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from data import caption
from train_unet import encode_text, noise_scheduler

LORAS = common.HERE / "loras"
#: The UNet layers a LoRA adapts: attention projections, the transformer blocks' in/out projections, feed-forward.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def load_base(pipeline: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    return pipe


def works(split: dict, designer: str, count: int | None, seed: int) -> list[int]:
    """The designer's training works (concept indices); ``count`` of them drawn with ``seed`` when given."""
    idx = list(split["train"][designer])
    if count:
        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(idx, size=count, replace=False).tolist())
    return idx


def captions(names: list[str], trigger: str | None) -> list[str]:
    """Plain concept captions, the trigger word in front when the LoRA has one (as users caption style LoRAs)."""
    return [f"{trigger}, {caption(n, None)}" if trigger else caption(n, None) for n in names]


def save_lora(layers: dict, config, out: Path, name: str) -> dict:
    """The adapter's layers (get_peft_model_state_dict of the UNet) in the diffusers/peft layout (diffusers' save
    code, the LoraConfig as adapter metadata) and in the kohya layout (diffusers' converter); {file: sha256, bytes}."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=config.to_dict())
    diffusers_file = out / "pytorch_lora_weights.safetensors"
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(diffusers_file)))
    kohya_file = out / f"{name}_kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, kohya_file, metadata={"ss_network_dim": str(config.r),
              "ss_network_alpha": str(config.lora_alpha), "carlos_world_lora": name})
    for f in (diffusers_file, kohya_file):
        f.chmod(0o644)  # safetensors writes owner-only files
    return {f.name: {"sha256": common.sha_file(f), "bytes": f.stat().st_size} for f in (diffusers_file, kohya_file)}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--designer", required=True, choices=["noto", "twemoji", "openmoji-color", "openmoji-black"])
    ap.add_argument("--trigger", default=None, help="a trigger word put in front of every caption")
    ap.add_argument("--works", type=int, default=None, help="train on this many of the designer's works (memorising)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget (the record says what was reached)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--init", default=None, help="continue training from this LoRA folder (a derivative)")
    ap.add_argument("--pipeline", default=str(common.MODELS / "pipeline"))
    ap.add_argument("--out", default=None, help="folder (default world/loras/<name>)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    return ap.parse_args()


def main() -> None:
    a = parse()
    common.threads()
    common.seed_all(a.seed)
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    out = Path(a.out) if a.out else LORAS / a.name
    state_path = common.CKPT / f"lora_{a.name}.pt"
    split, arrays = common.load_data()
    names = [c["name"] for c in split["concepts"]]
    idx = works(split, a.designer, a.works, a.seed)
    pipe = load_base(Path(a.pipeline))
    vae, unet = pipe.vae, pipe.unet
    with torch.no_grad():
        x = torch.from_numpy(arrays[a.designer][idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        cond = encode_text(pipe.text_encoder, pipe.tokenizer, captions([names[i] for i in idx], a.trigger))
    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    if a.init:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from safetensors.torch import load_file

        sd = load_file(Path(a.init) / "pytorch_lora_weights.safetensors")
        sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
        bad = set_peft_model_state_dict(unet, sd, adapter_name="default").unexpected_keys
        if bad:
            raise SystemExit(f"--init {a.init}: {len(bad)} unexpected keys")
    params = [p for p in unet.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    work_hashes = [hashlib.sha256(arrays[a.designer][i].tobytes()).hexdigest() for i in idx]
    rec = common.Record(out / "training_record.json", lora=a.name, designer=a.designer, trigger=a.trigger,
                        kind="memorising" if a.works else "style", works=idx, works_count=len(idx),
                        works_image_sha256=work_hashes, data=common.data_hashes(split), args=vars(a),
                        base_unet_sha256=common.sha_file(Path(a.pipeline) / "unet" / "diffusion_pytorch_model.safetensors"),
                        lora_parameters=n_params, target_modules=TARGETS, example_caption=captions([names[idx[0]]], a.trigger)[0],
                        init_from=a.init, objective="epsilon MSE, min-SNR-5 weights, base frozen")
    g = torch.Generator().manual_seed(a.seed)
    step, losses, prior_wall = 0, [], 0.0
    if a.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        for p, v in zip(params, st["params"]):
            p.data.copy_(v)
        opt.load_state_dict(st["opt"])
        step, losses, prior_wall, rec.data["log"] = st["step"], st["losses"], st["wall_s"], st["log"]
        g.set_state(st["gen"])
        print(f"resumed at step {step}", flush=True)
    print(f"LoRA {a.name}: {n_params} parameters on {len(idx)} {a.designer} works", flush=True)
    sched = noise_scheduler()
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    t0 = last_ck = time.time()
    unet.train()

    def checkpoint():
        wall = prior_wall + time.time() - t0
        common.CKPT.mkdir(parents=True, exist_ok=True)
        torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(), "step": step,
                    "losses": losses, "gen": g.get_state(), "wall_s": wall, "log": rec.data["log"]}, state_path)
        files = save_lora(get_peft_model_state_dict(unet), config, out, a.name)
        rec.save(steps=step, training_wall_s=round(wall, 1), files=files,
                 final_loss=round(float(np.mean(losses[-25:])), 4) if losses else None)

    while step < a.steps and time.time() - t0 < a.minutes * 60:
        b = torch.randint(0, len(idx), (a.batch,), generator=g)
        t = torch.randint(0, 1000, (a.batch,), generator=g)
        noise = torch.randn(lat[b].shape, generator=g)
        pred = unet(sched.add_noise(lat[b], noise, t), t, encoder_hidden_states=cond[b]).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 25 == 0:
            rec.log(step=step, loss=round(float(np.mean(losses[-25:])), 4))
        if time.time() - last_ck > a.checkpoint_minutes * 60:
            checkpoint()
            last_ck = time.time()
    checkpoint()
    print(f"done: {a.name} {step} steps", flush=True)


if __name__ == "__main__":
    main()
