"""Generation-free head-to-head of two LoRA files: how alike are their weight changes?

Each LoRA module changes one layer's weight by

    dW = s * U @ D,    s = alpha / rank (alpha absent or 0 -> alpha = rank, s = 1)

with ``U`` the up factor (out x r) and ``D`` the down factor (r x in). peft/diffusers files
call them ``lora_B`` (up) and ``lora_A`` (down) and store alpha in diffusers'
``lora_adapter_metadata``; kohya files store it as a ``.alpha`` tensor. Conv LoRAs are
flattened: down ``(r, in, kh, kw) -> (r, in*kh*kw)``, up ``(out, r, 1, 1) -> (out, r)``;
LyCORIS ``lora_mid`` (tucker) factors are folded into an effective down factor, and LoHa, LoKr
and full ``diff`` modules are expanded to dense ``dW`` (see ``lora_file.module_delta``).

The Frobenius inner product of two low-rank changes is computed without forming ``dW``:

    <U1 D1, U2 D2>_F = trace(D1^T U1^T U2 D2) = trace((D1 D2^T)^T (U1^T U2))
                     = sum((U1^T U2) * (D1 D2^T))          (elementwise product)

``U1^T U2`` and ``D1 D2^T`` are only r1 x r2, so ranks may differ and the cost is
O((out + in) r1 r2) instead of O(out in (r1 + r2)).

Modules are matched by canonical diffusers name (``lora_file``), so a kohya file and a
diffusers file holding the same weights compare as identical. Over the shared modules:

    cosine     = sum_m <dW_A,m, dW_B,m> / sqrt(sum_m |dW_A,m|^2 * sum_m |dW_B,m|^2)
    norm_ratio = sqrt(sum_m |dW_B,m|^2) / sqrt(sum_m |dW_A,m|^2)

i.e. the cosine and norm ratio of the two LoRAs seen as one long vector of all shared weight
changes (big modules weigh more). Per-module cosines are reported too. Modules present in only
one file do not enter these numbers and are listed instead.
"""

from __future__ import annotations

import math
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.lora.fileformat import LoraFile, check_not_pickle
from carlos_audit.lora.flux_weights import flux_view, view_delta
from carlos_audit.vectors import cosine_from_products
from carlos_audit.lora.modules import (
    TensorReader,
    delta_inner,
    delta_shape,
    detect_format,
    read_modules,
)


def _open(path) -> tuple[LoraFile, dict, int, dict]:
    """The file (a path, or the ``LoraFile`` a run read once), its header and its modules."""
    source = path if isinstance(path, LoraFile) else LoraFile(path)
    if source.is_pickle:
        check_not_pickle(source.path, False, source.data)  # refused, even where the run allowed it
    header, payload_start, _ = source.header()
    modules = read_modules(source.path, header, payload_start)
    if not modules:
        raise AuditError(f"{source.path}: no LoRA modules recognised; nothing to compare")
    return source, header, payload_start, modules


def compare_weights(path_a: "str | Path | LoraFile", path_b: "str | Path | LoraFile") -> dict:
    """Compare the weight changes of two LoRA safetensors files; a JSON-serialisable dict.

    Keys: ``cosine`` and ``norm_ratio`` (over shared modules, defined in the module docstring;
    None if undefined), ``payload_identical``, ``modules_compared``, ``modules_only_in_a``,
    ``modules_only_in_b``, ``modules_skipped`` (shared modules left out, with the reason:
    DoRA, tucker LoHa/LoKr, shape mismatch), ``per_module`` (``name, cosine, norm_a, norm_b``),
    ``norm_a``, ``norm_b``, ``format_a``, ``format_b``, ``sha256_a``, ``sha256_b``,
    ``payload_sha256_a``, ``payload_sha256_b``.

    Pickle files are refused. Both files are opened read-only; either may be the ``LoraFile``
    a run read (not read again to hash it).
    """
    source_a, header_a, start_a, modules_a = _open(path_a)
    source_b, header_b, start_b, modules_b = _open(path_b)
    path_a, path_b = source_a.path, source_b.path

    view_a, view_b = flux_view(modules_a), flux_view(modules_b)  # FLUX.1: compared as diffusers modules
    names_a, names_b = set(view_a or modules_a), set(view_b or modules_b)
    with TensorReader(path_a, header_a, start_a) as reader_a, TensorReader(path_b, header_b, start_b) as reader_b:
        per_module, skipped, (inner_total, sq_a_total, sq_b_total) = _compare_modules(
            (reader_a, modules_a, view_a), (reader_b, modules_b, view_b), sorted(names_a & names_b))
    pay_a, pay_b = source_a.payload_sha256(), source_b.payload_sha256()
    return {
        "cosine": cosine_from_products(inner_total, sq_a_total, sq_b_total),
        "norm_ratio": math.sqrt(sq_b_total / sq_a_total) if sq_a_total > 0 else None,
        "norm_a": math.sqrt(sq_a_total),
        "norm_b": math.sqrt(sq_b_total),
        "payload_identical": pay_a == pay_b,
        "modules_compared": len(per_module),
        "modules_only_in_a": sorted(names_a - names_b),
        "modules_only_in_b": sorted(names_b - names_a),
        "modules_skipped": skipped,
        "per_module": per_module,
        "path_a": str(path_a),
        "path_b": str(path_b),
        "format_a": detect_format(header_a),
        "format_b": detect_format(header_b),
        "sha256_a": source_a.sha256,
        "sha256_b": source_b.sha256,
        "payload_sha256_a": pay_a,
        "payload_sha256_b": pay_b,
    }


def _compare_modules(a: tuple, b: tuple, shared: list[str]) -> tuple[list, list, tuple]:
    """Per shared module: the cosine and norms of the two weight changes (``a``, ``b``: reader,
    modules, Flux view), the skipped ones with the reason, and the sums (inner, |a|^2, |b|^2)."""
    (reader_a, modules_a, view_a), (reader_b, modules_b, view_b) = a, b
    per_module, skipped = [], []
    inner_total = sq_a_total = sq_b_total = 0.0
    for name in shared:
        delta_a = view_delta(reader_a, modules_a, view_a, name)
        delta_b = view_delta(reader_b, modules_b, view_b, name)
        reason = delta_a.get("unsupported") or delta_b.get("unsupported")
        if reason is None and delta_shape(delta_a) != delta_shape(delta_b):
            reason = f"shape mismatch {list(delta_shape(delta_a))} vs {list(delta_shape(delta_b))}"
        if reason is not None:
            skipped.append({"name": name, "reason": reason})
            continue
        inner = delta_inner(delta_a, delta_b)
        sq_a = max(delta_inner(delta_a, delta_a), 0.0)
        sq_b = max(delta_inner(delta_b, delta_b), 0.0)
        inner_total += inner
        sq_a_total += sq_a
        sq_b_total += sq_b
        per_module.append(
            {
                "name": name,
                "cosine": cosine_from_products(inner, sq_a, sq_b),
                "norm_a": math.sqrt(sq_a),
                "norm_b": math.sqrt(sq_b),
            }
        )
    return per_module, skipped, (inner_total, sq_a_total, sq_b_total)


#: Thresholds of the weight-space reading; their error rates on generated LoRA pairs are measured
#: by ``tests/weight_families.py`` (bench/bench_weights_error.py, docs/VALIDATION.md).
SAME_COSINE = 0.999       # cosine at or above: the same weight changes (up to a factor)
RESCALE_TOLERANCE = 0.01  # |norm ratio - 1| above: rescaled
PARTIAL_COSINE = 0.5      # cosine at or above (and below SAME_COSINE): partial similarity
ERROR_RATES_FILE = Path(__file__).resolve().parent / "weight_error_rates.json"

#: class -> one-line reading (an indicator, never a conclusion about copying or authorship)
READINGS = {
    "identical-payload": "re-upload (tensor payload identical; metadata may differ)",
    "none": "no comparable modules (no shared LoRA modules with computable weight changes)",
    "rescaled-copy": "rescaled copy",
    "same-weights": "same weights (possibly different format)",
    "merge-like": "high but partial similarity (consistent with a merge or continued training)",
    "unrelated": "low similarity (consistent with independent training)",
}


def weights_class(result: dict) -> str:
    """The class of a ``compare_weights`` result (a key of ``READINGS``)."""
    if result.get("payload_identical"):
        return "identical-payload"
    cosine, ratio = result.get("cosine"), result.get("norm_ratio")
    if cosine is None:
        return "none"
    if cosine >= SAME_COSINE:
        if ratio is not None and abs(ratio - 1.0) > RESCALE_TOLERANCE:
            return "rescaled-copy"
        return "same-weights"
    if cosine >= PARTIAL_COSINE:
        return "merge-like"
    return "unrelated"


def class_error_rates(cls: str) -> dict | None:
    """How often the generated pairs of each family got the reading ``cls`` (the measured table
    ``ERROR_RATES_FILE``, written by bench/bench_weights_error.py); None when it is absent."""
    from carlos_audit.fileio import read_json

    if not ERROR_RATES_FILE.is_file():
        return None
    table = read_json(ERROR_RATES_FILE)
    return {"class": cls, "reps": table["reps"], "thresholds": table["thresholds"],
            "source": "bench/bench_weights_error.py (docs/VALIDATION.md)", "families": rates_for_class(table, cls)}


def weights_reading(result: dict) -> str:
    """A one-line reading of a ``compare_weights`` result, phrased as an indicator.

    These readings describe what the numbers are consistent with; they are not conclusions
    about copying, authorship or infringement.
    """
    return READINGS[weights_class(result)]


def rates_for_class(table: dict, cls: str) -> list[dict]:
    """Per family: how often the generated pairs of that family got the reading ``cls``."""
    out: dict[str, dict] = {}
    for row in table.get("rows", []):
        f = out.setdefault(row["family"], {"family": row["family"], "expected": row["expected"], "given": 0, "n": 0})
        f["given"] += row["counts"].get(cls, 0)
        f["n"] += row["n"]
    return list(out.values())
