"""GPU fast path: which speed settings a loaded pipeline gets, decided from device, dtype and
architecture alone (``select``, a pure function), then applied where the pipeline is moved to
its device (``apply``, called from models/loading.py).

On the CPU (float32 only) nothing is selected and ``apply`` changes nothing: the CPU path stays
bit-for-bit what it was. On CUDA:

- the UNet (and text encoders) run in the case's dtype (float16/bfloat16 when asked or ``auto``);
- the VAE is kept in float32 where a half-precision VAE overflows: SDXL's VAE (NaN / black images
  in float16), or any VAE whose config says ``force_upcast``. The VAE weights are converted once
  and its ``decode`` casts the incoming half-precision latents to float32 (diffusers' own
  ``upcast_vae`` does the same per call, converting the weights back and forth);
- attention uses torch's scaled_dot_product_attention (diffusers ``AttnProcessor2_0``, the
  default on torch 2; set explicitly when some processor is not SDPA);
- CLIP image features are computed on the same device, a whole unit batched, in float32
  (raw features keep full precision);
- ``torch.compile`` of the UNet forward only when asked (``CARLOS_AUDIT_TORCH_COMPILE=1``):
  compiling takes minutes and pays off only over long builds; the hooks of cost.py stay outside
  the compiled region.

``CARLOS_AUDIT_FASTPATH=0`` turns every setting off (for A/B comparisons). The settings a run
used are recorded in manifest.environment.fastpath; when active they are part of the
base-image cache key (they change the numbers).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class FastPath:
    device: str
    dtype: str
    architecture: str
    unet_dtype: str
    vae_dtype: str
    attention: str  # "sdpa" (set explicitly) or "unchanged"
    clip_device: str
    clip_dtype: str
    compile_unet: bool
    reasons: tuple = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        """True when ``apply`` changes anything about the loaded pipeline."""
        return self.vae_dtype != self.dtype or self.attention == "sdpa" or self.compile_unet

    def as_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["active"] = self.active
        return d


def select(device: str, dtype: str, architecture: str, *, vae_force_upcast: bool = False,
           sdpa_available: bool = True, compile: bool = False, enabled: bool = True) -> FastPath:
    """Pure decision: the settings for a pipeline on ``device`` in ``dtype`` of ``architecture``
    ("sd15", "sdxl", "other"), given the VAE config's ``force_upcast`` and whether torch has
    scaled_dot_product_attention."""
    cuda = device.startswith("cuda")
    reasons = []
    vae_dtype = dtype
    attention = "unchanged"
    do_compile = False
    if not enabled:
        reasons.append("disabled (CARLOS_AUDIT_FASTPATH=0)")
    elif not cuda:
        reasons.append(f"device {device}: no fast path (the CPU path is kept bit-for-bit)")
    else:
        if dtype in HALF and (architecture == "sdxl" or vae_force_upcast):
            vae_dtype = "float32"
            why = "SDXL VAE" if architecture == "sdxl" else "VAE config force_upcast"
            reasons.append(f"VAE kept in float32: {why} overflows in {dtype}")
        if sdpa_available:
            attention = "sdpa"
            reasons.append("attention: torch scaled_dot_product_attention (AttnProcessor2_0)")
        if compile:
            do_compile = True
            reasons.append("torch.compile of the UNet forward (CARLOS_AUDIT_TORCH_COMPILE=1)")
    return FastPath(device=device, dtype=dtype, architecture=architecture, unet_dtype=dtype, vae_dtype=vae_dtype,
                    attention=attention, clip_device=device, clip_dtype="float32", compile_unet=do_compile,
                    reasons=tuple(reasons))


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")


def select_for(pipe, device: str, dtype: str, architecture: str) -> FastPath:
    """``select`` with the facts read from a loaded pipeline and the environment."""
    import torch

    vae = getattr(pipe, "vae", None)
    force = bool(getattr(getattr(vae, "config", None), "force_upcast", False)) if vae is not None else False
    return select(device, dtype, architecture, vae_force_upcast=force,
                  sdpa_available=hasattr(torch.nn.functional, "scaled_dot_product_attention"),
                  compile=_env_flag("CARLOS_AUDIT_TORCH_COMPILE", False),
                  enabled=_env_flag("CARLOS_AUDIT_FASTPATH", True))


def apply(pipe, fp: FastPath) -> dict:
    """Apply the selected settings to ``pipe`` (in place). Returns the record for the manifest."""
    if fp.vae_dtype != fp.dtype and getattr(pipe, "vae", None) is not None:
        upcast_vae(pipe.vae)
    if fp.attention == "sdpa" and getattr(pipe, "unet", None) is not None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        procs = getattr(pipe.unet, "attn_processors", {})
        if any(type(p).__name__ != "AttnProcessor2_0" for p in procs.values()):
            pipe.unet.set_attn_processor(AttnProcessor2_0())
    if fp.compile_unet and getattr(pipe, "unet", None) is not None:
        import torch

        pipe.unet.forward = torch.compile(pipe.unet.forward)  # hooks run in __call__, outside
    return fp.as_dict()


def upcast_vae(vae) -> None:
    """Keep ``vae`` in float32 for good: convert its weights once and make ``decode`` cast the
    latents it is given to float32 (pipelines hand it latents in the UNet's dtype)."""
    import torch

    vae.to(torch.float32)
    if getattr(vae, "_carlos_upcast", False):
        return
    orig = vae.decode

    def decode(z, *args, **kwargs):
        return orig(z.to(torch.float32), *args, **kwargs)

    vae.decode = decode
    vae._carlos_upcast = True


def apply_fastpath(pipe, device: str, dtype: str, architecture: str) -> dict:
    """select + apply: what models/loading.py calls after moving the pipeline to its device."""
    return apply(pipe, select_for(pipe, device, dtype, architecture))
