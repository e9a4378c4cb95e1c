"""LoRA files of every LyCORIS family, made by the real LyCORIS library (``lycoris-lora``).

``make_lycoris_file`` creates a network with ``lycoris.kohya.create_network`` (the network
sd-scripts trains with) on a pipeline's UNet and text encoder, fills every factor from a seeded
generator (non-zero, sized so the weight change is a fair fraction of the weight), and saves it
with the library's own ``save_weights``: kohya-style ``lora_unet_*`` / ``lora_te_*`` keys. The
transformers-5 text encoder is put under a ``text_model`` attribute so the library writes the
``lora_te_text_model_encoder_...`` names real sd-scripts files carry.

``library_network`` loads such a file back with the library (``create_network_from_weights``)
and applies it with ``apply_to``: the library's own forward, the oracle the tool is checked
against. No key or tensor here is written by hand.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class MadeFile:
    """A file the library saved, and the library's network that saved it, still applied (its
    forward: the oracle) to copies of the models; ``base_*`` are the unpatched originals."""

    path: Path
    network: object
    unet: object
    text_encoder: object
    base_unet: object
    base_text_encoder: object

    def detach(self) -> None:
        """The library's modules off the models (their forward back to the layer's own)."""
        for lora in self.network.loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.network.loras:
            lora.multiplier = multiplier

    @property
    def by_component(self) -> dict:
        te = len(self.network.text_encoder_loras)
        return {k: v for k, v in (("text_encoder", te), ("unet", len(self.network.unet_loras))) if v}

#: family -> (create_network kwargs, preset overrides). Each is a family the library writes.
FAMILIES = {
    "locon": {"algo": "locon"},
    "locon_tucker": {"algo": "locon", "use_tucker": True},
    "dora": {"algo": "lora", "dora_wd": True},
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr", "factor": 4},
    "lokr_full": {"algo": "lokr", "factor": 4, "full_matrix": True},
    "lokr_tucker": {"algo": "lokr", "factor": 4, "use_tucker": True},
    "dokr": {"algo": "lokr", "factor": 4, "dora_wd": True},
    "full": {"algo": "full"},
    "ia3": {"algo": "ia3", "preset": "carlos-ia3"},
    "glora": {"algo": "glora"},
    "diag-oft": {"algo": "diag-oft", "constraint": 0.0},
    "diag-oft_rescaled": {"algo": "diag-oft", "rescaled": True},
    "boft": {"algo": "boft", "preset": "carlos-boft"},
}


def _presets() -> dict:
    """The library's "full" preset without the TimestepEmbedding block (on a diffusers UNet it
    names time_embedding.linear_1 twice: "duplicated lora name"); its "ia3" preset with the
    target names as the regular expressions ``re.match`` needs (as shipped it matches nothing on
    SD); BOFT without the tiny text encoder's 37-wide MLP (no butterfly split of 37)."""
    from lycoris.config import PRESET

    full = dict(PRESET["full"], unet_target_module=[m for m in PRESET["full"]["unet_target_module"] if m != "TimestepEmbedding"])
    ia3 = dict(PRESET["ia3"], unet_target_name=[r".*\.to_k$", r".*\.to_v$", r".*ff\.net\.2$"],
               text_encoder_target_name=[r".*k_proj$", r".*v_proj$", r".*mlp\.fc2$"],
               name_algo_map={r".*ff\.net\.2$": {"train_on_input": True}, r".*mlp\.fc2$": {"train_on_input": True}})
    boft = dict(full, exclude_name=[r".*mlp\.fc1$"])
    return {"carlos-full": full, "carlos-ia3": ia3, "carlos-boft": boft}


class TextModelHolder(torch.nn.Module):
    """Holds a CLIPTextModel under ``text_model``, as sd-scripts' (transformers 4) encoder is seen."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder


@contextlib.contextmanager
def class_presets(preset: str | None = None):
    """The library keeps its preset in class attributes: apply ``preset`` (if given) for the
    block, and leave none behind. Quiet: the library's INFO logging off."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {k: getattr(LycorisNetworkKohya, k) for k in dir(LycorisNetworkKohya) if k.isupper()}
    try:
        if preset:
            LycorisNetworkKohya.apply_preset(_presets()[preset])
        with quiet():
            yield
    finally:
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)


@contextlib.contextmanager
def quiet():
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fill(network, seed: int, gain: float) -> None:
    """Every parameter of the network from a seeded normal, scaled to its fan-in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(network.named_parameters()):
            if name.endswith("dora_scale") or name.endswith("rescale"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                continue
            if name.endswith("oft_blocks"):  # the rotation's skew part, a fair fraction of I
                p.copy_(torch.randn(p.shape, generator=g) * gain * 0.3)
                continue
            fan = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) * gain / max(fan, 1) ** 0.5)


def make_lycoris_file(pipe, family: str, path: Path, seed: int = 0, dim: int = 4, alpha: float = 2.0,
                      text_encoder: bool = True, gain: float = 0.6, copy: bool = True) -> MadeFile:
    """A LoRA file of ``family`` made by the LyCORIS library on ``pipe``'s UNet (and text encoder).

    As sd-scripts does: ``create_network``, ``apply_to``, (training: here seeded values),
    ``save_weights``. With ``copy`` the network is made on copies of the models (``apply_to`` of
    the ``full`` family takes the weight off the original layer); without it (full-size models)
    every module is restored afterwards, leaving ``pipe`` as it was.
    """
    import copy as copying

    from lycoris.kohya import create_network

    from lycoris.config import PRESET

    kwargs = dict(FAMILIES[family])
    preset = kwargs.pop("preset", "carlos-full")
    PRESET.update(_presets())
    unet = copying.deepcopy(pipe.unet) if copy else pipe.unet
    te = (TextModelHolder(copying.deepcopy(pipe.text_encoder) if copy else pipe.text_encoder)
          if text_encoder else None)
    with class_presets():
        network = create_network(1.0, dim, alpha, pipe.vae, te, unet, preset=preset,
                                 **{k: str(v) if isinstance(v, bool) else v for k, v in kwargs.items()})
        network.apply_to(te, unet, te is not None, True)
    _fill(network, seed, gain)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya", "family": family})
    return MadeFile(path, network, unet, te.text_model if te is not None else None, pipe.unet, pipe.text_encoder)


def library_models(pipe, path: Path, multiplier: float = 1.0):
    """``(unet, text_encoder)``: copies of ``pipe``'s, with the file loaded and applied by the
    library itself (``create_network_from_weights``, then ``apply_to``: its own forward)."""
    import copy

    from lycoris.kohya import create_network_from_weights

    unet, te = copy.deepcopy(pipe.unet), TextModelHolder(copy.deepcopy(pipe.text_encoder))
    with class_presets("carlos-full"):  # the default preset names time_embedding twice
        network, _ = create_network_from_weights(multiplier, str(path), pipe.vae, te, unet)
        network.apply_to(te, unet, True, True)
    return unet, te.text_model, network
