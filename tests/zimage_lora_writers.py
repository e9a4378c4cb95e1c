"""Z-Image LoRA files in every layout, written by the trainers' own code where it runs here and,
where it cannot, by following that code step for step (file and line cited at each writer).

Every file starts from one peft LoRA of a Z-Image transformer (``peft_lora``: peft's own
``inject_adapter_in_model`` with a ``LoraConfig``, factors from a seeded generator):

* ``diffusers_peft``: diffusers' own ``ZImagePipeline.save_lora_weights`` (``transformer.`` names);
* ``peft``: peft's own ``get_peft_model`` + ``get_peft_model_state_dict`` (``base_model.model.``);
* ``diffsynth``: the peft-injected model's own ``state_dict()`` LoRA entries, peft's adapter level
  ``.default.`` kept, no prefix: what DiffSynth-Studio saves of a peft-injected DiT;
* ``ai_toolkit``: ai-toolkit renames the saved ``transformer.`` keys to ``diffusion_model.``
  (ostris/ai-toolkit@27a03a91, extensions_built_in/diffusion_models/z_image/z_image.py,
  ``convert_lora_weights_before_save``, lines 467-472); ai-toolkit itself cannot be imported here
  (it pulls its whole training stack), so the rename is applied to diffusers' saved keys;
* ``kohya_zimage``: musubi-tuner's LoRANetwork names (kohya-ss/musubi-tuner@30c658c4,
  src/musubi_tuner/networks/lora.py: ``lora_unet`` + the module path with ``.`` -> ``_``;
  ``lora_down`` = A, ``lora_up`` = B, an ``alpha`` buffer; networks/lora_zimage.py excludes
  ``_modulation`` and ``_refiner`` modules); bench/zimage_trainer_files.py runs that code itself
  and checks these files against it;
* ``comfyui``: musubi-tuner's networks/convert_z_image_lora_to_comfy.py (same commit), forward
  direction: ``attention_to_out_0`` -> ``attention_out``, to_q/to_k/to_v merged into one
  ``attention_qkv`` with the downs stacked, a block-sparse up and alpha x 3 (its lines 94-140);
* ``lycoris``: the LyCORIS library's ``create_lycoris`` (SimpleTuner's path), ``lycoris_`` names,
  saved with the network's own ``save_weights``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

#: peft target modules (a regex: the blocks' attention, feed-forward and modulation linears)
TARGETS = r".*\.(to_q|to_k|to_v|to_out\.0|w1|w2|w3)$|.*(layers|refiner)\.\d+\.adaLN_modulation\.0$"
PEFT_LAYOUTS = ("diffusers_peft", "peft", "diffsynth", "ai_toolkit", "kohya_zimage", "comfyui")


def _fill(model, seed: int, gain: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[-1] ** 0.5)


def peft_lora(transformer, rank: int = 4, alpha: float = 2.0, seed: int = 0, targets=TARGETS):
    """A copy of ``transformer`` with a peft LoRA (adapter "default") on ``targets``, filled from a
    seeded generator; returns the peft-injected copy."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(transformer)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model)
    _fill(model, seed)
    return model


def _peft_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _save(path: Path, state: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path


def _kohya(state: dict, alpha: float, skip=("_modulation", "_refiner")) -> dict:
    """musubi-tuner LoRANetwork names: lora_unet_<module with . -> _>.lora_down/lora_up/alpha."""
    out = {}
    for key, value in state.items():
        module, _, role = key.rpartition(".lora_")
        if any(s in module.replace(".", "_") for s in skip):
            continue
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _to_comfy(state: dict) -> dict:
    """musubi-tuner convert_z_image_lora_to_comfy.py, sd-scripts -> ComfyUI: rename, then merge
    q/k/v (downs concatenated; up block-sparse, (3 out, 3 rank); alpha x 3)."""
    state = {k.replace("attention_to_out_0", "attention_out"): v for k, v in state.items()}
    for key in sorted(k for k in state if "attention_to_q" in k and "lora_up" in k):
        prefix = key.split(".", 1)[0].replace("to_q", "")
        downs = [state.pop(f"{prefix}{s}.lora_down.weight") for s in ("to_q", "to_k", "to_v")]
        ups = [state.pop(f"{prefix}{s}.lora_up.weight") for s in ("to_q", "to_k", "to_v")]
        alpha = state.pop(f"{prefix}to_q.alpha")
        state.pop(f"{prefix}to_k.alpha")
        state.pop(f"{prefix}to_v.alpha")
        down = torch.cat(downs, dim=0)
        rank, rows = ups[0].shape[1], ups[0].shape[0]
        up = torch.zeros((3 * rows, down.shape[0]), dtype=down.dtype)
        for i, u in enumerate(ups):
            up[i * rows:(i + 1) * rows, i * rank:(i + 1) * rank] = u
        state[f"{prefix}qkv.lora_down.weight"] = down
        state[f"{prefix}qkv.lora_up.weight"] = up
        state[f"{prefix}qkv.alpha"] = alpha * 3
    return state


#: layouts that store no alpha: their trainers' scale is 1 (alpha = rank), and so is every loader's
NO_ALPHA = ("peft", "diffsynth", "ai_toolkit")


def layout_alpha(layout: str, rank: int = 4) -> float:
    """The alpha a file of ``layout`` is written with: 2 where the layout stores it (kohya's
    tensor, diffusers' adapter metadata), else the rank."""
    return float(rank) if layout in NO_ALPHA else 2.0


def write_layout(path: Path, transformer, layout: str, *, rank: int = 4, seed: int = 0,
                 metadata: dict | None = None) -> Path:
    """A Z-Image LoRA file of ``layout`` (see the module doc) for ``transformer``; its source is
    ``peft_lora(transformer, rank, layout_alpha(layout, rank), seed)``."""
    from diffusers import ZImagePipeline
    from safetensors.torch import load_file

    alpha = layout_alpha(layout, rank)

    model = peft_lora(transformer, rank, alpha, seed)
    state = _peft_state(model)
    path = Path(path)
    if layout in ("diffusers_peft", "ai_toolkit"):
        tmp = path.parent / f".{path.stem}-diffusers"
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS).to_dict()  # the adapter's own config
        ZImagePipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name="w.safetensors",
                                         transformer_lora_adapter_metadata=config)
        saved = load_file(str(tmp / "w.safetensors"))
        if layout == "diffusers_peft":
            from safetensors import safe_open

            with safe_open(str(tmp / "w.safetensors"), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return _save(path, saved, {**meta, **(metadata or {})})
        saved = {k.replace("transformer.", "diffusion_model."): v for k, v in saved.items()}
        return _save(path, saved, {"format": "pt", "software": '{"name": "ai-toolkit"}', **(metadata or {})})
    if layout == "peft":
        return _save(path, {f"base_model.model.{k}": v for k, v in state.items()}, metadata)
    if layout == "diffsynth":
        return _save(path, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}, metadata)
    kohya = _kohya(state, alpha)
    if layout == "kohya_zimage":
        return _save(path, kohya, metadata)
    if layout == "comfyui":
        return _save(path, _to_comfy(kohya), metadata)
    raise ValueError(layout)


def peft_weight_changes(transformer, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """``{"transformer.<module>": dW}`` of the peft LoRA every layout is written from (float64):
    ``alpha / rank * B @ A``, the dense merge of the source."""
    model = peft_lora(transformer, rank, alpha, seed)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().double()
            b = module.lora_B["default"].weight.detach().double()
            out[f"transformer.{name}"] = module.scaling["default"] * (b @ a)
    return out


def lycoris_file(path: Path, transformer, algo: str, seed: int = 0, **kwargs):
    """A LyCORIS network made by the library on a copy of ``transformer`` (every linear layer of
    the Z-Image blocks), filled from a seeded generator, saved with its own ``save_weights``;
    returns ``(path, the library's network applied to its copy, the copy)``."""
    from lycoris import LycorisNetwork, create_lycoris

    model = copy.deepcopy(transformer)
    saved = {"target_module": list(LycorisNetwork.TARGET_REPLACE_MODULE),
             "target_name": list(LycorisNetwork.TARGET_REPLACE_NAME)}
    LycorisNetwork.apply_preset({"target_module": ["ZImageTransformerBlock"], "target_name": []})
    try:
        net = create_lycoris(model, 1.0, linear_dim=kwargs.pop("dim", 4), linear_alpha=kwargs.pop("alpha", 2.0),
                             algo=algo, **kwargs)
    finally:
        LycorisNetwork.apply_preset(saved)
    net.apply_to()
    _fill_lycoris(net, seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris", "family": algo})
    return Path(path), net, model


def _fill_lycoris(net, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                continue
            fan = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / max(fan, 1) ** 0.5)


# ----------------------------------------------------------------------------- the tool and the references


def linears(pipe) -> dict:
    return {f"transformer.{n}": m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def tool_changes(pipe, path: Path) -> tuple[dict, dict, dict]:
    """The tool's load record, inspection and ``{module: dW}`` (float64) at scale 1, through
    run/load.load_lora (the run's path) and the weight patch; the pipeline is restored after."""
    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.run import patch
    from carlos_audit.run.load import load_lora

    inspection = inspect_lora(path)
    state = load_lora(pipe, path, "t", inspection, allow_partial=True)
    before = {n: m.weight.detach().double().clone() for n, m in linears(pipe).items()}
    patch.activate(pipe, "t", 1.0)
    changes = {n: m.weight.detach().double() - before[n] for n, m in linears(pipe).items()
               if not torch.equal(m.weight.detach().double(), before[n])}
    patch.unload(pipe)
    if not all(torch.equal(m.weight.detach().double(), before[n]) for n, m in linears(pipe).items()):
        raise AssertionError("the base weights did not come back bit for bit")
    return state, inspection, changes


def diffusers_changes(path: Path) -> dict | str:
    """``{module: dW}`` as diffusers' own loader applies the file (peft scaling x B @ A of each
    wrapped layer), or the one-line error it raises."""
    from carlos_audit.models.loading import load_base_pipeline

    pipe = load_base_pipeline("embedded:tiny-zimage", dtype="float32", device="cpu").pipe
    try:
        pipe.load_lora_weights(str(path), adapter_name="d")
    except Exception as e:  # the oracle is absent for a file diffusers cannot load: recorded, not hidden
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    out = {}
    for name, module in pipe.transformer.named_modules():
        if hasattr(module, "lora_A") and "d" in module.lora_A:
            a, b = module.lora_A["d"].weight.detach().double(), module.lora_B["d"].weight.detach().double()
            out[f"transformer.{name}"] = module.scaling["d"] * (b @ a)
    return out


def rel_error(got: dict, want: dict) -> float:
    """max |got - want| over the largest |want|, module by module; the module sets must agree."""
    if set(got) != set(want):
        raise AssertionError(f"modules differ: {sorted(set(got) ^ set(want))[:4]}")
    scale = max(float(w.abs().max()) for w in want.values())
    return max(float((got[n] - want[n]).abs().max()) for n in want) / scale


def library_forward_error(net, model, pipe, changes: dict) -> float:
    """max |tool - library| / max |library| over the outputs of every module of a LyCORIS
    network, on seeded inputs: the library's own forward (``net`` applied to ``model``) against
    the layer with the tool's weight change (``changes``, from ``tool_changes``)."""
    layers, base = dict(model.named_modules()), linears(pipe)
    worst, scale = 0.0, 0.0
    for lora in net.loras:
        target = next(n for n in base if n.replace(".", "_") == "transformer_" + lora.lora_name.removeprefix("lycoris_"))
        module = layers[target.removeprefix("transformer.")]
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = module(x).double()
            w0 = base[target].weight.detach().double()
            got = torch.nn.functional.linear(x.double(), w0 + changes.get(target, 0 * w0),
                                             None if module.bias is None else module.bias.detach().double())
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return worst / scale
