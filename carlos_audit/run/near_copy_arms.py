"""The run's part of the near-copy exhibit (``[near_copies]``, case/near_copies.py): the claimed
works checked for blank and repeated pictures before anything is generated, the two extraction
arms generated through the ordinary arm/unit machinery (``run_arm``: resumable units
``units/nearcopy-base``, ``units/nearcopy-lora``; the base arm from the base-image cache when
present), and the generation-free weight indicator computed against the loaded base weights.

    nearcopy-base   no LoRA, the extraction prompts and seeds (the control)
    nearcopy-lora   the case's LoRA at its scale, the same prompts and seeds

The prompt text is the same in both arms (the trigger words, when asked, are part of it); these
arms are not profiles of the case: Direction, Strength and the other measures never read them.
"""

from __future__ import annotations

import numpy as np

from carlos_audit.case import near_copies as spec
from carlos_audit.run.arms import TARGET_ADAPTER, Arm

#: the base weight's principal subspace of the weight indicator: its top WEIGHT_K left singular vectors
WEIGHT_K = 8


def arms(case, lora_sha256: str) -> tuple[Arm, Arm]:
    """(control arm, LoRA arm) of the extraction protocol."""
    return (Arm(spec.BASE_ARM, None, 0.0, False),
            Arm(spec.LORA_ARM, TARGET_ADAPTER, case.lora.scale, False, lora_sha256))


def check(case) -> None:
    """Before any generation: the works refused when every one is blank (case/near_copies.py)."""
    if spec.configured(case.near_copies):
        spec.check_works(case)


def generate(session, case, lora_sha256: str, runner) -> dict:
    """Both extraction arms generated through ``runner`` (run_arm: finished units skipped);
    {arm name: stats}; {} without [near_copies]."""
    if not spec.configured(case.near_copies):
        return {}
    pairs = spec.pairs(case)
    return {arm.name: runner(arm, pairs) for arm in arms(case, lora_sha256)}


def module_energies(pipe, lora_path, scale: float) -> tuple[dict, list[str]]:
    """{module: (energy, off-subspace energy)} of the LoRA's low-rank modules against the loaded
    base weights, and the modules left out (other families, or no matching layer)."""
    from carlos_audit.lora.modules import TensorReader, module_delta, read_modules

    modules = read_modules(lora_path)
    energies, left_out = {}, []
    with TensorReader(lora_path) as reader:
        for name, module in sorted(modules.items()):
            delta = module_delta(reader, module) if module["kind"] in ("lora", "lora_tucker") else {}
            w0 = base_weight(pipe, name)
            if "up" not in delta or w0 is None or w0.shape[0] != delta["up"].shape[0] \
                    or w0.reshape(w0.shape[0], -1).shape[1] != delta["down"].shape[1]:
                left_out.append(name)
                continue
            energies[name] = off_subspace_energy(w0, delta["up"], delta["down"], delta["scale"] * scale, WEIGHT_K)
    return energies, left_out


def off_subspace_energy(w0: np.ndarray, up: np.ndarray, down: np.ndarray, scale: float, k: int = WEIGHT_K) -> tuple[float, float]:
    """(energy of dW, energy of dW outside the top-k left singular subspace of w0) of one module;
    w0 (out, in...), up (out, r), down (r, in); dW = scale * up @ down is never formed:
    ||dW||^2 = tr(up G up^T), ||U_k^T dW||^2 = tr(U_k^T up G up^T U_k), G = down down^T."""
    w0 = np.asarray(w0, np.float64).reshape(w0.shape[0], -1)
    up, down = np.asarray(up, np.float64) * float(scale), np.asarray(down, np.float64)
    u = np.linalg.svd(w0, full_matrices=False)[0][:, :min(k, min(w0.shape))]
    gram = down @ down.T
    total = float(np.einsum("ij,jk,ik->", up, gram, up))
    proj = u.T @ up
    inside = float(np.einsum("ij,jk,ik->", proj, gram, proj))
    return total, max(0.0, total - inside)


def base_weight(pipe, name: str) -> np.ndarray | None:
    """The base weight of the pipeline layer a module names (``component.dotted.path``), as
    float64 numpy; None when the pipeline has no such layer. A peft-wrapped layer's base weight."""
    import torch

    component, _, body = name.partition(".")
    model = getattr(pipe, component, None)
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        layer = model.get_submodule(body)
    except AttributeError:
        return None
    layer = getattr(layer, "base_layer", layer)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return weight.detach().to("cpu", torch.float64).numpy()


def record(session, case, lora_path) -> dict | None:
    """The run record's ``near_copies``: the extraction protocol as run and, per LoRA module, the
    energies of the weight indicator (computed with the base weights restored; aggregated per
    block by the analysis, analysis/near_copies.weight_indicator)."""
    from carlos_audit.run.generate import set_adapter_state

    if not spec.configured(case.near_copies):
        return None
    set_adapter_state(session.pipe, None, 0.0)
    energies, left_out = module_energies(session.pipe, lora_path, case.lora.scale)
    prompts = spec.prompts(case)
    return {"prompts": [{"id": p.id, "category": p.category, "subcategory": p.subcategory, "text": p.text}
                        for p in prompts],
            "seeds": spec.seeds(case), "samples_per_prompt": case.near_copies.samples_per_prompt,
            "trigger_words": case.near_copies.trigger_words, "alpha": case.near_copies.alpha,
            "arms": {"base": spec.BASE_ARM, "lora": spec.LORA_ARM},
            "weights": {"k": WEIGHT_K, "modules": {n: list(e) for n, e in energies.items()},
                        "modules_left_out": left_out}}
