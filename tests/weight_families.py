"""Error rates of the weight-space reading, measured on generated families of LoRA pairs.

Each pair is two safetensors files written to a temporary folder and compared with
``weights.compare_weights`` / ``weights.weights_class`` (the path a case takes). A LoRA is a set
of modules shaped like SD attention projections, each ``dW = up @ down`` with
``down ~ N(0, 1/in)`` (rank x in) and ``up ~ N(0, 1/rank)`` (out x rank). Families, with the
class the reading should give:

    identical payload   the same tensors, other metadata                  identical-payload
    format change       the same factors, kohya vs diffusers layout       same-weights
    rescaled copy       up x f, f in RESCALE_FACTORS                      rescaled-copy
    merge               (1 - r) A + r B of an unrelated B, r in MERGE_RATIOS
                        (factors concatenated: rank 2r)                   merge-like
    continued training  both factors + noise of relative size e, e in NOISE_LEVELS
                                                                          merge-like
    unrelated           independent LoRAs of ranks RANK_PAIRS             unrelated
    unrelated, same init  independent up factors on one shared down factor
                        (two trainings from the same seed: down moves little from its init)
                                                                          unrelated

``measure(reps)`` returns, per family and parameter, the count of each class over ``reps``
seeded pairs. These are synthetic pairs: real LoRAs trained on similar data may agree more than
independent random factors do, so the unrelated rows are a lower bound on real false matches.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from carlos_audit.lora.weights import READINGS, compare_weights, rates_for_class, weights_class  # noqa: F401

SCHEMA = "carlos-audit/weight-error-rates/1"
RESCALE_FACTORS = (0.5, 0.8, 0.98, 1.25, 2.0)
MERGE_RATIOS = (0.1, 0.3, 0.5, 0.6, 0.7, 0.9)
NOISE_LEVELS = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0)
RANK_PAIRS = ((4, 4), (8, 8), (16, 16), (32, 32), (4, 32))
#: (module name, in, out): a slice of an SD 1.5 UNet's attention projections
MODULES = tuple(
    (f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn{a}.{p}", w, w)
    for b, w in ((0, 320), (1, 640)) for a in (1, 2) for p in ("to_q", "to_v")
)
EXPECTED = {
    "identical payload": "identical-payload", "format change": "same-weights", "rescaled copy": "rescaled-copy",
    "merge": "merge-like", "continued training": "merge-like", "unrelated": "unrelated",
    "unrelated, same init": "unrelated",
}


def random_lora(rng: np.random.Generator, rank: int, down: dict | None = None) -> dict:
    out = {}
    for name, fin, fout in MODULES:
        d = down[name] if down is not None else rng.standard_normal((rank, fin)) / np.sqrt(fin)
        out[name] = (d, rng.standard_normal((fout, rank)) / np.sqrt(rank))
    return out


def _write(path: Path, factors: dict, fmt: str = "diffusers", note: str = "a") -> Path:
    from safetensors.numpy import save_file

    tensors = {}
    for name, (down, up) in factors.items():
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": np.array(down.shape[0], dtype=np.float32)})
        else:
            tensors.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path),
              metadata={"note": note})
    return path


def _noisy(rng, factors: dict, e: float) -> dict:
    return {n: (d + e * np.linalg.norm(d) / np.sqrt(d.size) * rng.standard_normal(d.shape),
                u + e * np.linalg.norm(u) / np.sqrt(u.size) * rng.standard_normal(u.shape))
            for n, (d, u) in factors.items()}


def family_pairs(rng: np.random.Generator):
    """Yield (family, parameter, factors_a, factors_b, format_b, note_b) for one replicate."""
    a = random_lora(rng, 8)
    yield "identical payload", "-", a, a, "diffusers", "b"
    yield "format change", "-", a, a, "kohya", "a"
    for f in RESCALE_FACTORS:
        yield "rescaled copy", f"x{f:g}", a, {n: (d, u * f) for n, (d, u) in a.items()}, "diffusers", "a"
    other = random_lora(rng, 8)
    for r in MERGE_RATIOS:
        merged = {n: (np.concatenate([a[n][0], other[n][0]]), np.concatenate([(1 - r) * a[n][1], r * other[n][1]], axis=1))
                  for n in a}
        yield "merge", f"r={r:g}", a, merged, "diffusers", "a"
    for e in NOISE_LEVELS:
        yield "continued training", f"noise {e:g}", a, _noisy(rng, a, e), "diffusers", "a"
    for ra, rb in RANK_PAIRS:
        yield "unrelated", f"ranks {ra}/{rb}", random_lora(rng, ra), random_lora(rng, rb), "diffusers", "a"
    shared = {n: d for n, (d, _) in a.items()}
    yield "unrelated, same init", "rank 8", a, random_lora(rng, 8, down=shared), "diffusers", "a"


def measure(reps: int = 20, seed: int = 0) -> dict:
    """Counts of each reading class per (family, parameter) over ``reps`` seeded replicates."""
    from carlos_audit.lora.weights import PARTIAL_COSINE, RESCALE_TOLERANCE, SAME_COSINE

    rows: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="carlos-families-") as tmp:
        for rep in range(reps):
            rng = np.random.default_rng([seed, rep])
            for i, (family, param, fa, fb, fmt, note) in enumerate(family_pairs(rng)):
                pa = _write(Path(tmp) / f"a{i}.safetensors", fa)
                pb = _write(Path(tmp) / f"b{i}.safetensors", fb, fmt, note)
                r = compare_weights(pa, pb)
                row = rows.setdefault((family, param), {"family": family, "parameter": param, "expected": EXPECTED[family],
                                                         "counts": dict.fromkeys(READINGS, 0), "cosines": []})
                row["counts"][weights_class(r)] += 1
                row["cosines"].append(r["cosine"])
    out = []
    for row in rows.values():
        cos = np.array([c for c in row.pop("cosines") if c is not None])
        n = sum(row["counts"].values())
        row.update(n=n, correct=row["counts"][row["expected"]], error_rate=1 - row["counts"][row["expected"]] / n,
                   cosine_median=float(np.median(cos)) if cos.size else None)
        out.append(row)
    return {"schema": SCHEMA, "reps": reps, "seed": seed,
            "thresholds": {"same_cosine": SAME_COSINE, "rescale_tolerance": RESCALE_TOLERANCE, "partial_cosine": PARTIAL_COSINE},
            "modules": len(MODULES), "rows": out}
