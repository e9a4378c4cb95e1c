"""Small LoRA files for tests: peft/diffusers and kohya layouts of the same low-rank factors."""

import numpy as np
from safetensors.numpy import save_file


def write_peft(path, factors, metadata=None):
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"unet.{name}.lora_A.weight"] = down
        tensors[f"unet.{name}.lora_B.weight"] = up
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_kohya(path, factors, alpha=None, metadata=None):
    tensors = {}
    for name, (down, up) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path
