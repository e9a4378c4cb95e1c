"""How exactly carlos-audit applies each LyCORIS family, against the library's own forward.

    OMP_NUM_THREADS=1 PYTHONPATH=.:tests .venv/bin/python bench/bench_lycoris_families.py

Every family the library (lycoris-lora) writes is made by the library on the tiny SD pipeline
(tests/lycoris_files.py: create_network, apply_to, seeded factors, save_weights), loaded by
carlos-audit (run/load.py -> diffusers or run/patch.py) and compared on the same inputs:

* UNet and text-encoder output, tool vs the library's forward of the network that saved the file,
  at scale 1 and 0.5: max |difference| and max |difference| / max |output|;
* the LoRA's own effect (library output vs base output), so the figures have a yardstick;
* the library's ``merge_to`` weight change (``get_merged_weight``) over its forward's, per module
  (mean of <merge, forward> / |forward|^2);
* the library reloading its own file (``create_network_from_weights`` + ``apply_to``) against
  the network that saved it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("CARLOS_AUDIT_HOME", tempfile.mkdtemp(prefix="carlos-bench-"))


def main() -> None:
    from lycoris_files import FAMILIES, library_models, make_lycoris_file

    from carlos_audit.lora.inspection import inspect_lora
    from carlos_audit.models.loading import load_base_pipeline
    from carlos_audit.run.generate import set_adapter_state
    from carlos_audit.run.load import load_lora
    from carlos_audit.run.patch import STATES, unload

    pipe = load_base_pipeline("embedded:tiny-sd", dtype="float32", device="cpu").pipe
    g = torch.Generator().manual_seed(7)
    x, t, enc = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 600]), torch.randn(2, 9, 32, generator=g)
    ids = torch.randint(0, 49407, (2, 12), generator=g)

    @torch.no_grad()
    def out(unet, te):
        return unet(x, t, encoder_hidden_states=enc).sample, te(ids).last_hidden_state

    def diff(a, b):
        d = float((a - b).abs().max())
        return d, d / float(b.abs().max())

    base = out(pipe.unet, pipe.text_encoder)
    folder = Path(tempfile.mkdtemp(prefix="lycoris-"))
    made = {f: make_lycoris_file(pipe, f, folder / f"{f}.safetensors", seed=i + 1) for i, f in enumerate(sorted(FAMILIES))}
    print(f"{'family':18} {'method':14} {'scale':>5} {'UNet max|d|':>11} {'rel':>8} {'TE max|d|':>10} {'rel':>8}"
          f" {'LoRA effect rel':>15} {'merge/fwd':>9} {'reload rel':>10}")
    for family, m in made.items():
        try:
            unet, te, _ = library_models(pipe, m.path)
            reload = f"{diff(out(unet, te)[0], out(m.unet, m.text_encoder)[0])[1]:10.1e}"
        except Exception as e:  # the library cannot reload some of its own files
            reload = f"{type(e).__name__:>10}"
        state = load_lora(pipe, m.path, "t", inspect_lora(m.path), allow_partial=False)
        ratios = []
        if family != "locon":
            layers = {lo.lora_name: lo for lo in m.network.loras}
            set_adapter_state(pipe, "t", 1.0)
            patched = {id(tg): tg.layer.weight.detach().clone() for tg in STATES[pipe].adapters["t"]}
            set_adapter_state(pipe, None)
            for tg in STATES[pipe].adapters["t"]:
                prefix = "lora_unet_" if tg.component == "unet" else "lora_te_text_model_"
                lo = layers.get(prefix + tg.layer_name.replace(".", "_"))
                if lo is None:
                    continue
                w0, w_base = patched[id(tg)], tg.layer.weight.detach()
                with torch.no_grad():
                    merged = lo.get_merged_weight(1.0, w_base.shape, w_base.device)[0] - w_base
                fwd = (w0 - w_base).flatten()
                if float(fwd @ fwd) > 0:
                    ratios.append(float(merged.flatten() @ fwd / (fwd @ fwd)))
        for scale in (1.0, 0.5):
            m.set_multiplier(scale)
            want = out(m.unet, m.text_encoder)
            set_adapter_state(pipe, "t", scale)
            got = out(pipe.unet, pipe.text_encoder)
            (du, ru), (dt, rt) = diff(got[0], want[0]), diff(got[1], want[1])
            effect = diff(want[0], base[0])[1]
            merge = f"{sum(ratios) / len(ratios):9.3f}" if ratios and scale == 1.0 else " " * 9
            print(f"{family:18} {state['application']['method']:14} {scale:5.1f} {du:11.1e} {ru:8.1e} {dt:10.1e} {rt:8.1e}"
                  f" {effect:15.3f} {merge} {reload if scale == 1.0 else ''}")
        m.set_multiplier(1.0)
        set_adapter_state(pipe, None)
        unload(pipe)
        pipe.unload_lora_weights()


if __name__ == "__main__":
    main()
