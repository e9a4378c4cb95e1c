"""Safe intake of a LoRA file: validation, hashes, format and architecture, metadata.

Everything here treats the file as untrusted evidence:

* It is opened read-only and never modified.
* Pickle-based checkpoints (``.ckpt``, ``.pt``, ``.bin``, ``.pth``, ``.pkl``, or anything that
  starts with pickle/zip magic) are refused, because unpickling can execute code. With
  ``allow_unsafe_pickle=True`` they are let through *this* module, which still never unpickles.
* A safetensors file is validated from its own 8-byte length and JSON header (parsed here with
  ``struct`` + ``json``) before ``safetensors`` sees it: every size in the header is checked
  against the file, and the tensors must tile the payload exactly (no overlap, gap or trailing
  bytes), as the safetensors specification requires.
* ``__metadata__`` strings (kohya ``ss_*``, ``sshs_*``, ``modelspec.*``) are reported as
  SELF-REPORTED: anyone can write anything there.

The safetensors layout::

    [8 bytes: N, little-endian u64][N bytes: JSON header][payload: tensor bytes]

Header entries are ``name -> {"dtype", "shape", "data_offsets": [begin, end]}`` with offsets
relative to the payload start, plus an optional ``"__metadata__": {str: str}``.

Hashes:

* ``sha256``: the whole file.
* ``autov2``: the first 10 hex digits of ``sha256`` (Civitai "AutoV2").
* ``payload_sha256``: sha256 of the payload (everything after the 8-byte length and the header).
  It does not change when only ``__metadata__`` is edited. This is Civitai "AutoV3" and kohya's
  ``sshs_model_hash``.

This module imports numpy and safetensors only; torch is imported solely to decode float8
tensors, and only when such a tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import AuditError
from .hashing import sha256_file

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".bin", ".pth", ".pkl")

_PICKLE_REFUSAL = (
    "pickle files can execute code when loaded and are refused; convert the file to safetensors "
    "in an isolated environment, or pass --allow-unsafe-pickle if you accept that risk"
)


def _check_regular_file(path: Path) -> int:
    """Return the size of ``path`` or raise AuditError if it is missing, not a file or empty."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AuditError(f"LoRA file not found: {path}") from None
    except OSError as e:
        raise AuditError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AuditError(f"{path} is a directory, not a LoRA file")
    if not stat.S_ISREG(st.st_mode):
        raise AuditError(f"{path} is not a regular file")
    if st.st_size == 0:
        raise AuditError(f"{path} is empty (0 bytes)")
    return st.st_size


def _reject_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def read_header(path: str | Path) -> tuple[dict, int, int]:
    """Validate a safetensors file; return ``(header, payload_start, file_size)``.

    ``payload_start`` is ``8 + header length``. Reads only the 8-byte length and the header,
    never the payload. See ``validate_safetensors`` for what is refused.
    """
    path = Path(path)
    size = _check_regular_file(path)
    if size < 8:
        raise AuditError(f"{path} is too short to be safetensors ({size} bytes; at least 8 needed)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise AuditError(
                f"{path}: declared safetensors header length {n} bytes is absurd "
                f"(limit {MAX_HEADER_BYTES}); not a safetensors file or corrupt"
            )
        if 8 + n > size:
            raise AuditError(
                f"{path}: declared safetensors header length {n} bytes exceeds the file size "
                f"({size} bytes); truncated or not a safetensors file"
            )
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuditError(f"{path}: safetensors header is not valid UTF-8") from None
    if not text.startswith("{"):
        raise AuditError(f"{path}: safetensors header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as e:
        raise AuditError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise AuditError(f"{path}: safetensors header is not a JSON object")

    payload_start = 8 + n
    payload_size = size - payload_start
    _validate_entries(path, header, payload_size)
    return header, payload_start, size


def _validate_entries(path: Path, header: dict, payload_size: int) -> None:
    metadata = header.get("__metadata__")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise AuditError(f"{path}: __metadata__ must be a JSON object of strings")
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise AuditError(f"{path}: __metadata__ value for {k!r} is not a string")

    spans = []  # (begin, end, name)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise AuditError(f"{path}: tensor {name!r} header entry is not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                raise AuditError(f"{path}: tensor {name!r} is missing {field!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise AuditError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise AuditError(f"{path}: tensor {name!r} shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise AuditError(f"{path}: tensor {name!r} data_offsets must be two non-negative integers")
        begin, end = offsets
        if end < begin:
            raise AuditError(f"{path}: tensor {name!r} data_offsets end {end} is before begin {begin}")
        if end > payload_size:
            raise AuditError(
                f"{path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside the payload "
                f"({payload_size} bytes)"
            )
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 != 0 or bits // 8 != end - begin:
            raise AuditError(
                f"{path}: tensor {name!r} occupies {end - begin} bytes but dtype {dtype} and "
                f"shape {shape} need {bits / 8:g}"
            )
        spans.append((begin, end, name))

    spans.sort()
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise AuditError(f"{path}: tensors {previous!r} and {name!r} overlap in the payload")
        if begin > position:
            raise AuditError(
                f"{path}: payload bytes {position}..{begin} are not covered by any tensor "
                "(safetensors requires the payload to be fully indexed)"
            )
        position, previous = end, name
    if position != payload_size:
        raise AuditError(
            f"{path}: {payload_size - position} trailing payload bytes after the last tensor are "
            "not covered by any tensor (safetensors requires the payload to be fully indexed)"
        )


def validate_safetensors(path: str | Path) -> dict:
    """Validate ``path`` as safetensors and return its parsed header.

    The header is ``{tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``
    exactly as stored (``__metadata__`` only if present). Raises AuditError, naming the file and
    the problem, for a missing file, a directory, an empty or too short file, an absurd or too
    long header length, a header that is not a UTF-8 JSON object (or repeats a key), malformed
    tensor entries, unknown dtypes, offsets outside the payload or reversed, byte sizes that
    disagree with dtype and shape, overlapping tensors, and payload gaps or trailing bytes.
    """
    header, _, _ = read_header(path)
    return header


# --------------------------------------------------------------------------------------------
# Pickle refusal
# --------------------------------------------------------------------------------------------


def _starts_like_pickle(path: Path, size: int) -> bool:
    """True if the file starts with pickle (protocol 2-5) or zip magic and is not safetensors.

    A safetensors length prefix can begin with the same bytes (e.g. a 640-byte header starts
    ``80 02``), so magic only counts when the prefix is not a plausible safetensors header:
    the declared length must fit in the file and the header must start with ``{``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    magic = head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    if not magic:
        return False
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size and head[8:9] == b"{":
            return False
    return True


def check_not_pickle(path: str | Path, allow_unsafe_pickle: bool = False) -> bool:
    """Refuse a pickle-based checkpoint; return True if ``path`` is one (and was allowed).

    A file is pickle-based if its extension is one of ``.ckpt .pt .bin .pth .pkl`` or its
    content starts with pickle or zip (torch) magic, whatever its name. Without
    ``allow_unsafe_pickle`` such a file raises AuditError. This module never unpickles.
    """
    path = Path(path)
    size = _check_regular_file(path)
    is_pickle = path.suffix.lower() in PICKLE_EXTENSIONS or _starts_like_pickle(path, size)
    if is_pickle and not allow_unsafe_pickle:
        raise AuditError(f"{path}: {_PICKLE_REFUSAL}")
    return is_pickle


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def payload_sha256(path: str | Path, payload_start: int | None = None) -> str:
    """sha256 of the tensor payload (Civitai AutoV3, kohya ``sshs_model_hash``)."""
    if payload_start is None:
        _, payload_start, _ = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(payload_start)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_hashes(path: str | Path) -> dict:
    """``{"sha256", "autov2", "payload_sha256"}`` of a validated safetensors file."""
    _, payload_start, _ = read_header(path)
    digest = sha256_file(path)
    return {
        "sha256": digest,
        "autov2": digest[:10],
        "payload_sha256": payload_sha256(path, payload_start),
    }


# --------------------------------------------------------------------------------------------
# Key parsing: tensor name -> (style, canonical module name, role)
# --------------------------------------------------------------------------------------------

# kohya name prefixes -> diffusers component
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_transformer_", "transformer"),
)

# kohya / LyCORIS suffix (after the module name) -> role
_KOHYA_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff": "diff",
    "diff_b": "diff_b",
    **{s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}

# diffusers / peft suffixes -> role
_PEFT_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
}
_LEGACY_ROLES = {
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
}
# attention-processor style: "...attn1.processor.to_q_lora.down.weight"
_LEGACY_PROCESSOR = re.compile(r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>\w+)_lora\.(?P<ud>down|up)\.weight$")

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
_UNET_ROOTS = (
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "encoder_hid_proj",
)


def _diffusers_canonical(module: str) -> str:
    """Add the component prefix a bare diffusers module path lacks (``down_blocks...`` -> unet)."""
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    first = module.split(".", 1)[0]
    if first in _COMPONENTS:
        return module
    if first in _UNET_ROOTS:
        return "unet." + module
    return module


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """``(style, canonical module name, role)`` for a LoRA tensor name, or None if unrecognised.

    style is ``"kohya"``, ``"peft"`` or ``"legacy"``.
    """
    for prefix, _ in _KOHYA_PREFIXES:
        if key.startswith(prefix) and "." in key:
            module, suffix = key.split(".", 1)
            role = _KOHYA_ROLES.get(suffix, f"other:{suffix}")
            return "kohya", kohya_to_diffusers_name(module), role
    for suffix, role in _PEFT_ROLES.items():
        if key.endswith("." + suffix):
            return "peft", _diffusers_canonical(key[: -len(suffix) - 1]), role
    for suffix, role in _LEGACY_ROLES.items():
        if key.endswith("." + suffix):
            return "legacy", _diffusers_canonical(key[: -len(suffix) - 1]), role
    m = _LEGACY_PROCESSOR.match(key)
    if m:
        proj = m["proj"] + (".0" if m["proj"] == "to_out" else "")
        return "legacy", _diffusers_canonical(f"{m['module']}.{proj}"), m["ud"]
    if key.endswith(".alpha"):  # alpha stored next to diffusers-style factors
        return "alpha_only", _diffusers_canonical(key[: -len(".alpha")]), "alpha"
    return None


# --------------------------------------------------------------------------------------------
# kohya module names -> diffusers dotted paths
# --------------------------------------------------------------------------------------------

# Names that contain underscores themselves; everything else splits at every underscore.
_COMPOUND_TOKENS = sorted(
    (
        tuple(t.split("_"))
        for t in (
            # diffusers UNet
            "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "time_emb_proj",
            "conv_shortcut", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
            "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "time_embedding",
            "linear_1", "linear_2", "conv_in", "conv_out", "conv_norm_out", "add_embedding",
            "encoder_hid_proj", "single_transformer_blocks", "context_embedder", "x_embedder",
            # original (LDM / SGM) UNet, used by kohya for SDXL
            "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers",
            "emb_layers", "skip_connection", "time_embed", "label_emb",
            # CLIP text encoders
            "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
            "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
            "position_embedding", "text_projection",
        )
    ),
    key=len,
    reverse=True,
)

_COMPOUNDS_BY_FIRST: dict[str, list[tuple[str, ...]]] = {}
for _compound in _COMPOUND_TOKENS:  # longest first within each list
    _COMPOUNDS_BY_FIRST.setdefault(_compound[0], []).append(_compound)


def _split_tokens(body: str) -> list[str]:
    """Split an underscore-joined path into tokens, keeping known compound names whole."""
    parts = body.split("_")
    tokens, i = [], 0
    while i < len(parts):
        for compound in _COMPOUNDS_BY_FIRST.get(parts[i], ()):
            if tuple(parts[i : i + len(compound)]) == compound:
                tokens.append("_".join(compound))
                i += len(compound)
                break
        else:
            tokens.append(parts[i])
            i += 1
    return tokens


_LDM_RESNET = {
    ("in_layers", "0"): "norm1",
    ("in_layers", "2"): "conv1",
    ("emb_layers", "1"): "time_emb_proj",
    ("out_layers", "0"): "norm2",
    ("out_layers", "3"): "conv2",
}


def _ldm_resnet(rest: list[str]) -> list[str]:
    if rest and rest[0] == "skip_connection":
        return ["conv_shortcut"] + rest[1:]
    if len(rest) >= 2 and (rest[0], rest[1]) in _LDM_RESNET:
        return [_LDM_RESNET[(rest[0], rest[1])]] + rest[2:]
    return rest


def _ldm_unet_to_diffusers(tokens: list[str]) -> list[str]:
    """Map original-UNet (LDM/SGM) tokens to diffusers tokens; SD 1.x / 2.x / SDXL layout.

    Assumes ``layers_per_block = 2`` (true for SD 1.x, 2.x and SDXL): input block ``i >= 1`` is
    down block ``(i-1)//3``, slot ``(i-1)%3`` (slot 2 = downsampler); output block ``i`` is up
    block ``i//3``, slot ``i%3``. Within a block, sub-index 0 is the resnet, then the
    attention (if any), then the up/downsampler. Tokens that do not fit are returned unchanged.
    """
    head = tokens[0]
    try:
        if head == "input_blocks":
            i, j, rest = int(tokens[1]), int(tokens[2]), tokens[3:]
            if i == 0:
                return ["conv_in"] + rest
            block, slot = (i - 1) // 3, (i - 1) % 3
            if slot == 2:
                return ["down_blocks", str(block), "downsamplers", "0", "conv"]
            if j == 0:
                return ["down_blocks", str(block), "resnets", str(slot)] + _ldm_resnet(rest)
            return ["down_blocks", str(block), "attentions", str(slot)] + rest
        if head == "middle_block":
            j, rest = int(tokens[1]), tokens[2:]
            if j == 1:
                return ["mid_block", "attentions", "0"] + rest
            return ["mid_block", "resnets", str(j // 2)] + _ldm_resnet(rest)
        if head == "output_blocks":
            i, j, rest = int(tokens[1]), int(tokens[2]), tokens[3:]
            block, slot = i // 3, i % 3
            if j == 0:
                return ["up_blocks", str(block), "resnets", str(slot)] + _ldm_resnet(rest)
            if rest and rest[0] == "conv":
                return ["up_blocks", str(block), "upsamplers", "0", "conv"]
            return ["up_blocks", str(block), "attentions", str(slot)] + rest
        if head == "time_embed":
            return ["time_embedding", {"0": "linear_1", "2": "linear_2"}[tokens[1]]]
        if head == "label_emb":
            return ["add_embedding", {"0": "linear_1", "2": "linear_2"}[tokens[2]]]
        if head == "out" and len(tokens) == 2:
            return [{"0": "conv_norm_out", "2": "conv_out"}[tokens[1]]]
    except (IndexError, KeyError, ValueError):
        pass
    return tokens


def _kohya_split_prefix(name: str) -> tuple[str | None, str]:
    for prefix, component in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None, name


def kohya_to_diffusers_name(name: str, known_module_names=None) -> str:
    """Map a kohya module name to its diffusers dotted path.

    ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` ->
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. The prefix
    (``lora_unet_``, ``lora_te_``/``lora_te1_`` -> ``text_encoder``, ``lora_te2_`` ->
    ``text_encoder_2``) becomes the component; a name without prefix gets none.

    Underscores are ambiguous (``to_q`` vs ``to.q``), so:

    * With ``known_module_names`` (the real module names of a model, e.g. from
      ``unet.named_modules()``, with or without the component prefix), the mapping is exact: the
      name must equal a known name with dots replaced by underscores. A name that matches no
      known module raises AuditError.
    * Without it, a best-effort rule splits at underscores except inside known compound
      names (``down_blocks``, ``transformer_blocks``, ``to_q``, ``proj_in``, ``time_emb_proj``,
      ``self_attn``, ``q_proj``, ...), which covers the standard SD UNet and CLIP names. Original
      (LDM) UNet names as kohya writes them for SDXL (``input_blocks_4_1_...``) are then mapped
      to diffusers blocks (see ``_ldm_unet_to_diffusers``).
    """
    component, body = _kohya_split_prefix(name)
    tokens = _split_tokens(body)
    if component in ("unet", None) and tokens and tokens[0] in (
        "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"
    ):
        tokens = _ldm_unet_to_diffusers(tokens)
    best_effort = ".".join(tokens)

    if known_module_names is not None:
        flat_targets = {body, best_effort.replace(".", "_")}
        for known in known_module_names:
            bare = known
            if component and known.startswith(component + "."):
                bare = known[len(component) + 1:]
            if bare.replace(".", "_") in flat_targets:
                return f"{component}.{bare}" if component else bare
        raise AuditError(f"kohya module {name!r} matches no module of the given model")

    return f"{component}.{best_effort}" if component else best_effort


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _module_kind(roles: set[str]) -> str:
    """lora | lora_tucker | dora | loha | lokr | full | incomplete."""
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if {"down", "up"} <= roles:
        if "dora_scale" in roles:
            return "dora"
        return "lora_tucker" if "mid" in roles else "lora"
    if "diff" in roles:
        return "full"
    return "incomplete"


def _group_modules(header: dict, source: str = "LoRA file") -> tuple[dict[str, dict], Counter, list[str]]:
    """Group tensor names into modules from the header alone (no tensor bytes read).

    Returns ``(modules, style_counts, unrecognised)`` where ``modules`` maps the canonical
    module name to ``{"keys": {role: tensor name}}``.
    """
    modules: dict[str, dict] = {}
    styles: Counter = Counter()
    unrecognised = []
    for key in header:
        if key == "__metadata__":
            continue
        parsed = _parse_key(key)
        if parsed is None:
            unrecognised.append(key)
            continue
        style, module, role = parsed
        if style != "alpha_only":
            styles[style] += 1
        entry = modules.setdefault(module, {"keys": {}})
        if role in entry["keys"]:
            raise AuditError(
                f"{source}: tensors {entry['keys'][role]!r} and {key!r} both give the {role} "
                f"factor of module {module!r}"
            )
        entry["keys"][role] = key
    # An alpha with no factors beside it is not a module.
    for name in [n for n, m in modules.items() if set(m["keys"]) == {"alpha"}]:
        unrecognised.append(modules.pop(name)["keys"]["alpha"])
    return modules, styles, sorted(unrecognised)


def detect_format(header: dict) -> str:
    """Name the LoRA format of a safetensors header.

    * ``lycoris_loha`` / ``lycoris_lokr`` / ``lycoris_locon_mid``: any ``hada_*`` / ``lokr_*`` /
      ``lora_mid`` tensor (checked in that order);
    * ``kohya``: ``lora_unet_*`` / ``lora_te[12]_*`` names with ``.lora_down.weight``,
      ``.lora_up.weight``, ``.alpha``;
    * ``diffusers_peft``: ``<module path>.lora_A.weight`` / ``.lora_B.weight``;
    * ``diffusers_legacy``: ``...to_q_lora.down.weight``, ``.lora.down.weight``,
      ``.lora_linear_layer.down.weight``;
    * ``mixed``: recognised keys of more than one of the last three styles;
    * ``unknown``: nothing recognised.
    """
    modules, styles, _ = _group_modules(header)
    roles = {role for m in modules.values() for role in m["keys"]}
    if any(r.startswith("hada_") for r in roles):
        return "lycoris_loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lycoris_lokr"
    if "mid" in roles:
        return "lycoris_locon_mid"
    if len(styles) > 1:
        return "mixed"
    if not styles:
        return "unknown"
    return {"kohya": "kohya", "peft": "diffusers_peft", "legacy": "diffusers_legacy"}[styles.most_common(1)[0][0]]


def _shape(header: dict, keys: dict, role: str):
    return header[keys[role]]["shape"] if role in keys else None


def _module_geometry(kind: str, header: dict, keys: dict) -> dict:
    """rank, in_features, out_features, kernel_size from header shapes (None where unknown).

    ``in_features`` is the layer's input channel count; for LoHa/LoKr conv layers whose kernel
    cannot be recovered from the shapes it is the flattened ``in * kh * kw``.
    """
    rank = in_f = out_f = kernel = None
    down, up, mid = _shape(header, keys, "down"), _shape(header, keys, "up"), _shape(header, keys, "mid")
    if kind in ("lora", "dora", "lora_tucker") and down and up and len(down) >= 2 and len(up) >= 2:
        rank, in_f, out_f = down[0], down[1], up[0]
        if len(down) == 4:
            kernel = down[2:]
        if mid and len(mid) == 4:
            kernel = mid[2:]
    elif kind == "loha":
        w1a, w1b = _shape(header, keys, "hada_w1_a"), _shape(header, keys, "hada_w1_b")
        if w1b and len(w1b) >= 1:
            rank = w1b[0]
        if "hada_t1" not in keys and w1a and w1b and len(w1a) == 2 and len(w1b) == 2:
            out_f, in_f = w1a[0], w1b[1]
    elif kind == "lokr":
        for role in ("lokr_w2_b", "lokr_w1_b"):
            s = _shape(header, keys, role)
            if s:
                rank = s[0]
                break
        w1 = _shape(header, keys, "lokr_w1") or (
            [_shape(header, keys, "lokr_w1_a")[0], _shape(header, keys, "lokr_w1_b")[1]]
            if "lokr_w1_a" in keys and "lokr_w1_b" in keys else None
        )
        w2 = _shape(header, keys, "lokr_w2") or (
            [_shape(header, keys, "lokr_w2_a")[0], _shape(header, keys, "lokr_w2_b")[1]]
            if "lokr_w2_a" in keys and "lokr_w2_b" in keys and "lokr_t2" not in keys else None
        )
        if w1 and w2 and len(w1) >= 2 and len(w2) >= 2:
            out_f, in_f = w1[0] * w2[0], w1[1] * w2[1]
            if len(w2) == 4:
                kernel = w2[2:]
    elif kind == "full":
        diff = _shape(header, keys, "diff")
        if diff and len(diff) >= 2:
            out_f, in_f = diff[0], diff[1]
            if len(diff) == 4:
                kernel = diff[2:]
    return {"rank": rank, "in_features": in_f, "out_features": out_f, "kernel_size": kernel}


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------


class TensorReader:
    """Read tensors of a *validated* safetensors file as float64 numpy arrays.

    Uses ``safetensors.safe_open(framework="numpy")``. numpy has no bfloat16, so BF16 tensors are
    decoded here from their bytes (exact: bf16 is the top half of a float32). float8 tensors are
    decoded with torch, imported only then. Use as a context manager.
    """

    def __init__(self, path: str | Path, header: dict | None = None, payload_start: int | None = None):
        self.path = Path(path)
        if header is None or payload_start is None:
            header, payload_start, _ = read_header(self.path)
        self.header = header
        self.payload_start = payload_start
        self._handle = None

    def __enter__(self):
        from safetensors import safe_open

        self._handle = safe_open(str(self.path), framework="numpy")
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        handle, self._handle = self._handle, None
        return handle.__exit__(*exc) if handle is not None else False

    def _raw(self, entry: dict) -> bytes:
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.payload_start + begin)
            return f.read(end - begin)

    def get(self, key: str) -> np.ndarray:
        entry = self.header[key]
        dtype = entry["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(self._raw(entry), dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).astype(np.float64).reshape(entry["shape"])
        if dtype.startswith("F8_"):
            return self._get_float8(key, dtype)
        if dtype in ("F4", "F6_E2M3", "F6_E3M2", "C64"):
            raise AuditError(f"{self.path}: tensor {key!r} has dtype {dtype}, which carlos-audit cannot read")
        if self._handle is None:
            raise RuntimeError("TensorReader must be used as a context manager")
        return np.asarray(self._handle.get_tensor(key), dtype=np.float64)

    def _get_float8(self, key: str, dtype: str) -> np.ndarray:
        try:
            import torch
            from safetensors import safe_open
        except ImportError:
            raise AuditError(f"{self.path}: tensor {key!r} is {dtype}; reading it needs torch") from None
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# Alpha and the effective low-rank factors
# --------------------------------------------------------------------------------------------


def _peft_configs(metadata: dict) -> dict[str, dict] | None:
    """Per-component peft configs from diffusers' ``lora_adapter_metadata`` (None if absent).

    diffusers stores ``json.dumps(config)``; pipeline saves prefix each key with the component
    (``"unet.lora_alpha"``). Returns ``{component or "": config}``. Self-reported, but it is what
    diffusers uses to scale the LoRA when loading it.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    configs: dict[str, dict] = {}
    for key, value in data.items():
        component, dot, field = key.rpartition(".")
        if dot and component in _COMPONENTS:
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _peft_alpha(configs: dict | None, module: str) -> tuple[float | None, bool]:
    r"""``(alpha, use_rslora)`` for a module from peft configs; alpha None if not stated.

    ``alpha_pattern`` keys are matched as peft does: ``re.match(rf"(.*\.)?({pattern})$", name)``
    against the module name inside its component.
    """
    if not configs:
        return None, False
    component, _, body = module.partition(".")
    if component in _COMPONENTS and component in configs:
        config, name = configs[component], body
    elif "" in configs:
        config, name = configs[""], body if component in _COMPONENTS else module
    else:
        return None, False
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", name):
                    alpha = value
                    break
            except re.error:
                continue
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        alpha = None
    return (float(alpha) if alpha is not None else None), bool(config.get("use_rslora", False))


def _scale(alpha: float | None, rank: int | None, use_rslora: bool = False) -> float:
    """The multiplier of ``up @ down``: alpha/rank (alpha/sqrt(rank) for rsLoRA).

    alpha absent or 0 means alpha = rank (kohya and diffusers both do this), i.e. scale 1.
    """
    if not rank or alpha is None or alpha == 0:
        return 1.0
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _flatten_down(down: np.ndarray) -> np.ndarray:
    """(r, in[, kh, kw]) -> (r, in*kh*kw)."""
    return down.reshape(down.shape[0], -1)


def _flatten_up(up: np.ndarray) -> np.ndarray:
    """(out, r[, 1, 1]) -> (out, r)."""
    return up.reshape(up.shape[0], -1)


def module_delta(reader: TensorReader, module: dict) -> dict:
    """The weight change ``dW`` of one module, in factored form where possible.

    ``module`` is an entry of ``read_modules``. Returns one of
    ``{"up": (out, r), "down": (r, in*kh*kw), "scale": s}`` (dW = s * up @ down, float64),
    ``{"dense": (out, in*kh*kw)}``, or ``{"unsupported": reason}``.
    Conv weights are flattened as ``(out, in, kh, kw) -> (out, in*kh*kw)`` throughout.
    """
    kind, keys, scale = module["kind"], module["keys"], module["scale"]
    if kind == "lora":
        return {"up": _flatten_up(reader.get(keys["up"])), "down": _flatten_down(reader.get(keys["down"])), "scale": scale}
    if kind == "lora_tucker":
        # y = up(mid(down(x))): W[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i]
        up = _flatten_up(reader.get(keys["up"]))
        down = _flatten_down(reader.get(keys["down"]))
        mid = reader.get(keys["mid"])
        if mid.ndim != 4:
            return {"unsupported": f"lora_mid of shape {list(mid.shape)} is not a conv kernel"}
        effective_down = np.einsum("abhw,bi->aihw", mid, down).reshape(mid.shape[0], -1)
        return {"up": up, "down": effective_down, "scale": scale}
    if kind == "loha":
        if "hada_t1" in keys or "hada_t2" in keys:
            return {"unsupported": "LoHa with tucker factors (hada_t1/hada_t2) is not supported"}
        w1 = reader.get(keys["hada_w1_a"]) @ reader.get(keys["hada_w1_b"])
        w2 = reader.get(keys["hada_w2_a"]) @ reader.get(keys["hada_w2_b"])
        return {"dense": scale * w1 * w2}
    if kind == "lokr":
        if "lokr_t2" in keys:
            return {"unsupported": "LoKr with a tucker factor (lokr_t2) is not supported"}
        w1 = reader.get(keys["lokr_w1"]) if "lokr_w1" in keys else reader.get(keys["lokr_w1_a"]) @ reader.get(keys["lokr_w1_b"])
        w2 = reader.get(keys["lokr_w2"]) if "lokr_w2" in keys else reader.get(keys["lokr_w2_a"]) @ reader.get(keys["lokr_w2_b"])
        # kron of (a, b) with the flattened (c, d*kh*kw) equals the flattened 4-D kron.
        return {"dense": scale * np.kron(w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1))}
    if kind == "full":
        diff = reader.get(keys["diff"])
        return {"dense": diff.reshape(diff.shape[0], -1)}
    if kind == "dora":
        return {"unsupported": "DoRA rescales the merged weight column-wise; dW depends on the base weights"}
    return {"unsupported": f"incomplete module (tensors: {', '.join(sorted(keys))})"}


def delta_inner(a: dict, b: dict) -> float:
    """Frobenius inner product ``<dW_a, dW_b>`` of two ``module_delta`` results.

    Low-rank pairs use ``<s1 U1 D1, s2 U2 D2> = s1 s2 sum((U1^T U2) * (D1 D2^T))`` (r1 x r2
    matrices only, dW never formed); a low-rank/dense pair uses ``<s U D, M> = s sum(U * (M D^T))``.
    """
    if "dense" in a and "dense" in b:
        return float(np.sum(a["dense"] * b["dense"]))
    if "dense" in a:
        a, b = b, a
    if "dense" in b:
        return float(a["scale"] * np.sum(a["up"] * (b["dense"] @ a["down"].T)))
    return float(a["scale"] * b["scale"] * np.sum((a["up"].T @ b["up"]) * (a["down"] @ b["down"].T)))


def delta_shape(d: dict) -> tuple[int, int]:
    """(out, in*kh*kw) of a ``module_delta`` result."""
    if "dense" in d:
        return tuple(d["dense"].shape)
    return (d["up"].shape[0], d["down"].shape[1])


def read_modules(path: str | Path, header: dict | None = None, payload_start: int | None = None) -> dict[str, dict]:
    """The LoRA modules of a validated safetensors file, from its header (+ alpha tensors).

    Returns ``{canonical name: {"kind", "keys": {role: tensor name}, "rank", "alpha",
    "alpha_source", "scale", "in_features", "out_features", "kernel_size",
    "parameter_count"}}``. ``alpha`` is the kohya ``.alpha`` tensor, else the peft
    ``lora_alpha`` from diffusers' ``lora_adapter_metadata``, else None (meaning alpha = rank).
    Pass ``header`` and ``payload_start`` from ``read_header`` to skip validating again.
    """
    if header is None or payload_start is None:
        header, payload_start, _ = read_header(path)
    groups, _, _ = _group_modules(header, str(path))
    configs = _peft_configs(header.get("__metadata__") or {})
    modules = {}
    with TensorReader(path, header, payload_start) as reader:
        for name in sorted(groups):
            keys = groups[name]["keys"]
            kind = _module_kind(set(keys))
            geometry = _module_geometry(kind, header, keys)
            alpha, alpha_source, rslora = None, None, False
            if "alpha" in keys:
                alpha_value = reader.get(keys["alpha"])
                if alpha_value.size != 1:
                    raise AuditError(f"{path}: alpha tensor {keys['alpha']!r} is not a scalar")
                alpha, alpha_source = float(alpha_value.reshape(())), "tensor"
            else:
                alpha, rslora = _peft_alpha(configs, name)
                alpha_source = "peft_metadata" if alpha is not None else None
            if kind == "lokr" and "lokr_w1" in keys and "lokr_w2" in keys:
                scale = 1.0  # LyCORIS: both Kronecker factors full -> alpha is ignored
            else:
                scale = _scale(alpha, geometry["rank"], rslora)
            parameter_count = sum(
                math.prod(header[k]["shape"]) for role, k in keys.items() if role != "alpha"
            )
            modules[name] = {
                "kind": kind,
                "keys": dict(sorted(keys.items())),
                **geometry,
                "alpha": alpha,
                "alpha_source": alpha_source,
                "scale": scale,
                "parameter_count": parameter_count,
            }
    return modules


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

_ATTN2_KV = re.compile(r"^unet\..*\.attn2\.(to_k|to_v)$")
_TRANSFORMER_INDEX = re.compile(r"^unet\..*\.transformer_blocks\.(\d+)\.")


def detect_architecture(modules: dict[str, dict]) -> tuple[str, dict]:
    """Guess the base-model family a LoRA was trained for: ``sdxl``, ``sd15`` or ``other``.

    The rule, first match wins (canonical diffusers names are used, so kohya SDXL
    ``input_blocks`` names count as the diffusers blocks they map to):

    1. The cross-attention dim, i.e. the in-features of UNet ``attn2.to_k`` / ``attn2.to_v``
       modules: 2048 -> ``sdxl``; 768 -> ``sd15``; any other single value (1024 is SD 2.x; 32 is
       the project's tiny test model) or conflicting values -> ``other``.
    2. No attn2 k/v module: ``text_encoder_2`` modules -> ``sdxl``.
    3. ``unet.down_blocks.0.attentions`` modules (SDXL's first down block has none) -> ``sd15``.
    4. ``transformer_blocks`` index >= 1 (SD 1.x has one transformer per attention, SDXL 2 or
       10) -> ``sdxl``.
    5. Otherwise ``other``.

    Returns ``(architecture, evidence)``; evidence has ``rule`` (which step decided),
    ``cross_attention_dims``, ``has_text_encoder_2``, ``has_down_blocks_0_attentions`` and
    ``max_transformer_block_index``.
    """
    dims = sorted({m["in_features"] for n, m in modules.items() if _ATTN2_KV.match(n) and m["in_features"]})
    has_te2 = any(n.startswith("text_encoder_2.") for n in modules)
    has_db0_attn = any(n.startswith("unet.down_blocks.0.attentions.") for n in modules)
    indices = [int(m[1]) for n in modules if (m := _TRANSFORMER_INDEX.match(n))]
    evidence = {
        "cross_attention_dims": dims,
        "has_text_encoder_2": has_te2,
        "has_down_blocks_0_attentions": has_db0_attn,
        "max_transformer_block_index": max(indices) if indices else None,
    }
    if dims:
        if dims == [2048]:
            arch = "sdxl"
        elif dims == [768]:
            arch = "sd15"
        else:
            arch = "other"
        evidence["rule"] = f"cross-attention dim {'/'.join(map(str, dims))} (attn2 to_k/to_v in-features)"
    elif has_te2:
        arch, evidence["rule"] = "sdxl", "text_encoder_2 modules present"
    elif has_db0_attn:
        arch, evidence["rule"] = "sd15", "unet down_blocks.0 has attentions"
    elif indices and max(indices) >= 1:
        arch, evidence["rule"] = "sdxl", "more than one transformer block per attention"
    else:
        arch, evidence["rule"] = "other", "no distinguishing modules"
    return arch, evidence


# --------------------------------------------------------------------------------------------
# Metadata (self-reported)
# --------------------------------------------------------------------------------------------


def claimed_base_model_hash(metadata: dict) -> dict | None:
    """The base-model hash the file claims, or None.

    ``ss_new_sd_model_hash`` (kohya: sha256 of the whole base checkpoint) is preferred;
    ``ss_sd_model_hash`` is the legacy A1111 hash of a 64 KiB window, flagged
    ``legacy: True`` because it cannot be compared with a sha256. Returns
    ``{"value", "source", "legacy"}``.
    """
    for key, legacy in (("ss_new_sd_model_hash", False), ("ss_sd_model_hash", True)):
        value = (metadata.get(key) or "").strip()
        if value:
            return {"value": value, "source": key, "legacy": legacy}
    return None


def _normalise_hex(value: str) -> str:
    value = value.strip().lower()
    return value[2:] if value.startswith("0x") else value


def compare_base_hash(claimed: str | None, base_sha256: str | None) -> str:
    """``"absent"`` if nothing is claimed, else ``"match"`` or ``"mismatch"``.

    A claim shorter than 64 hex digits (e.g. a 10-digit AutoV2) matches if it is a prefix of
    ``base_sha256`` and at least 10 digits long.
    """
    if not claimed or not claimed.strip():
        return "absent"
    if not base_sha256:
        raise ValueError("base_sha256 is required to compare a claimed hash")
    c, b = _normalise_hex(claimed), _normalise_hex(base_sha256)
    if c == b or (10 <= len(c) < 64 and b.startswith(c)):
        return "match"
    return "mismatch"


def trigger_word_hints(metadata: dict, top: int = 10) -> list[dict]:
    """Candidate trigger words from self-reported metadata.

    From ``modelspec.trigger_phrase``, kohya dataset folder names (``"10_sks dog"`` -> ``sks
    dog``, the kohya "<repeats>_<instance> <class>" convention) and the ``top`` most frequent
    caption tags in ``ss_tag_frequency``. Malformed JSON is ignored. Each hint is
    ``{"text", "source"}`` plus ``"count"`` for tags.
    """
    hints = []
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        hints.append({"text": phrase, "source": "modelspec.trigger_phrase"})
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        frequency = {}
    if not isinstance(frequency, dict):
        frequency = {}
    counts: Counter = Counter()
    folders = []
    for folder, tags in frequency.items():
        m = re.match(r"^\d+_(.+)$", str(folder))
        if m and m[1].strip():
            folders.append(m[1].strip())
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, int) and not isinstance(count, bool) and str(tag).strip():
                    counts[str(tag).strip()] += count
    for folder in sorted(set(folders)):
        hints.append({"text": folder, "source": "ss_tag_frequency dataset folder"})
    for tag, count in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:top]:
        hints.append({"text": tag, "source": "ss_tag_frequency", "count": count})
    return hints


# --------------------------------------------------------------------------------------------
# The intake report
# --------------------------------------------------------------------------------------------


def _fro(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(x * x)))


def _summary(values: list) -> dict:
    present = [v for v in values if v is not None]
    counts = Counter(present)
    return {
        "min": min(present) if present else None,
        "max": max(present) if present else None,
        "distinct": sorted(counts),
        "counts": {str(k): counts[k] for k in sorted(counts)},
        "absent": len(values) - len(present),
    }


def _pickle_report(path: Path, base_model_sha256: str | None) -> dict:
    digest = sha256_file(path)
    return {
        "path": str(path),
        "file_name": path.name,
        "size": path.stat().st_size,
        "sha256": digest,
        "autov2": digest[:10],
        "payload_sha256": None,
        "format": "pickle",
        "architecture": "other",
        "architecture_evidence": {"rule": "pickle file not opened (it is never unpickled here)"},
        "module_count": 0,
        "parameter_count": 0,
        "modules": [],
        "rank_summary": _summary([]),
        "alpha_summary": _summary([]),
        "weight_norm_total": None,
        "metadata": {},
        "claimed_base_model_hash": None,
        "base_model_hash_check": "not_checked" if base_model_sha256 is None else "absent",
        "trigger_word_hints": [],
        "unrecognised_tensors": [],
    }


def inspect_lora(path: str | Path, *, allow_unsafe_pickle: bool = False, base_model_sha256: str | None = None) -> dict:
    """Validate, hash and describe a LoRA file; a JSON-serialisable dict.

    Keys: ``path``, ``file_name``, ``size``, ``sha256``, ``autov2``, ``payload_sha256``,
    ``format`` (see ``detect_format``), ``architecture`` and ``architecture_evidence`` (see
    ``detect_architecture``), ``module_count``, ``parameter_count``, ``modules`` (list, sorted by
    name, of ``name, kind, rank, alpha, alpha_source, scale, in_features, out_features,
    kernel_size, parameter_count, down_norm, up_norm, delta_norm, tensors``), ``rank_summary``,
    ``alpha_summary``, ``weight_norm_total`` (Frobenius norm of all module dW together; None if
    no module could be computed), ``metadata`` (``__metadata__`` verbatim, SELF-REPORTED),
    ``claimed_base_model_hash`` (see ``claimed_base_model_hash``), ``base_model_hash_check``
    (``match | mismatch | absent``; ``legacy_not_comparable`` for a legacy-only claim;
    ``not_checked`` without ``base_model_sha256``), ``trigger_word_hints``,
    ``unrecognised_tensors``.

    A pickle file allowed with ``allow_unsafe_pickle`` is hashed but not opened: format
    ``pickle`` and no modules.
    """
    path = Path(path)
    if check_not_pickle(path, allow_unsafe_pickle):
        return _pickle_report(path, base_model_sha256)

    header, payload_start, size = read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    _, _, unrecognised = _group_modules(header, str(path))
    modules = read_modules(path, header, payload_start)
    architecture, evidence = detect_architecture(modules)

    rows, total_sq, any_delta = [], 0.0, False
    with TensorReader(path, header, payload_start) as reader:
        for name, m in modules.items():
            down_norm = up_norm = delta_norm = None
            delta = module_delta(reader, m)
            if m["kind"] == "lora":  # the factors are the stored tensors, flattened
                down_norm, up_norm = _fro(delta["down"]), _fro(delta["up"])
            elif m["kind"] in ("lora_tucker", "dora"):
                down_norm = _fro(reader.get(m["keys"]["down"]))
                up_norm = _fro(reader.get(m["keys"]["up"]))
            if "unsupported" not in delta:
                delta_norm = math.sqrt(max(delta_inner(delta, delta), 0.0))
                total_sq += delta_norm**2
                any_delta = True
            rows.append(
                {
                    "name": name,
                    "kind": m["kind"],
                    "rank": m["rank"],
                    "alpha": m["alpha"],
                    "alpha_source": m["alpha_source"],
                    "scale": m["scale"],
                    "in_features": m["in_features"],
                    "out_features": m["out_features"],
                    "kernel_size": m["kernel_size"],
                    "parameter_count": m["parameter_count"],
                    "down_norm": down_norm,
                    "up_norm": up_norm,
                    "delta_norm": delta_norm,
                    "tensors": sorted(m["keys"].values()),
                }
            )

    claim = claimed_base_model_hash(metadata)
    if base_model_sha256 is None:
        check = "not_checked"
    elif claim is None:
        check = "absent"
    elif claim["legacy"]:
        check = "legacy_not_comparable"
    else:
        check = compare_base_hash(claim["value"], base_model_sha256)

    digest = sha256_file(path)
    return {
        "path": str(path),
        "file_name": path.name,
        "size": size,
        "sha256": digest,
        "autov2": digest[:10],
        "payload_sha256": payload_sha256(path, payload_start),
        "format": detect_format(header),
        "architecture": architecture,
        "architecture_evidence": evidence,
        "module_count": len(rows),
        "parameter_count": sum(r["parameter_count"] for r in rows),
        "modules": rows,
        "rank_summary": _summary([r["rank"] for r in rows]),
        "alpha_summary": _summary([r["alpha"] for r in rows]),
        "weight_norm_total": math.sqrt(total_sq) if any_delta else None,
        "metadata": metadata,
        "claimed_base_model_hash": claim,
        "base_model_hash_check": check,
        "trigger_word_hints": trigger_word_hints(metadata),
        "unrecognised_tensors": unrecognised,
    }
