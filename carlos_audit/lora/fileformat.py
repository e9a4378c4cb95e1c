"""A LoRA file as untrusted bytes: safetensors validation, pickle refusal, hashes.

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
import io
import json
import math
import os
import stat
import struct
from pathlib import Path

from carlos_audit.errors import AuditError

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


def read_header(path: str | Path, data: bytes | None = None) -> tuple[dict, int, int]:
    """Validate a safetensors file; return ``(header, payload_start, file_size)``.

    ``payload_start`` is ``8 + header length``. Reads only the 8-byte length and the header,
    never the payload; from ``data`` (the file's bytes, already read: ``LoraFile``) when given.
    See ``validate_safetensors`` for what is refused.
    """
    path = Path(path)
    size = _check_regular_file(path) if data is None else len(data)
    if size < 8:
        raise AuditError(f"{path} is too short to be safetensors ({size} bytes; at least 8 needed)")
    with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
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
    spans = [_entry_span(path, name, entry, payload_size) for name, entry in header.items() if name != "__metadata__"]
    _check_spans(path, spans, payload_size)


def _entry_span(path: Path, name: str, entry, payload_size: int) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor's header entry, checked: fields, dtype, shape, offsets
    inside the payload and the byte size its dtype and shape need."""
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
    return begin, end, name


def _check_spans(path: Path, spans: list, payload_size: int) -> None:
    """The tensors tile the payload: no overlap, no gap, nothing after the last one."""
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


def _starts_like_pickle(path: Path, size: int, data: bytes | None = None) -> bool:
    """True if the file starts with pickle (protocol 2-5) or zip magic and is not safetensors.

    A safetensors length prefix can begin with the same bytes (e.g. a 640-byte header starts
    ``80 02``), so magic only counts when the prefix is not a plausible safetensors header:
    the declared length must fit in the file and the header must start with ``{``.
    """
    if data is not None:
        head = data[:9]
    else:
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


def check_not_pickle(path: str | Path, allow_unsafe_pickle: bool = False, data: bytes | None = None) -> bool:
    """Refuse a pickle-based checkpoint; return True if ``path`` is one (and was allowed).

    A file is pickle-based if its extension is one of ``.ckpt .pt .bin .pth .pkl`` or its
    content starts with pickle or zip (torch) magic, whatever its name. Without
    ``allow_unsafe_pickle`` such a file raises AuditError. This module never unpickles.
    """
    path = Path(path)
    size = _check_regular_file(path) if data is None else len(data)
    is_pickle = path.suffix.lower() in PICKLE_EXTENSIONS or _starts_like_pickle(path, size, data)
    if is_pickle and not allow_unsafe_pickle:
        raise AuditError(f"{path}: {_PICKLE_REFUSAL}")
    return is_pickle


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def payload_sha256(path: str | Path, payload_start: int | None = None, data: bytes | None = None) -> str:
    """sha256 of the tensor payload (Civitai AutoV3, kohya ``sshs_model_hash``); of ``data`` when given."""
    if payload_start is None:
        _, payload_start, _ = read_header(path, data)
    if data is not None:
        return hashlib.sha256(memoryview(data)[payload_start:]).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(payload_start)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()



# --------------------------------------------------------------------------------------------
# A LoRA file read once
# --------------------------------------------------------------------------------------------


class LoraFile:
    """A LoRA file read once per run (as datasette's ``Database`` holds its ``cached_hash``): its
    bytes, their sha256, whether it is pickle-based (refused unless ``allow_unsafe_pickle``) and,
    for safetensors, the validated header. Intake creates one per LoRA file and passes it down
    (the input record, ``inspect_lora``, the weight comparison), so nothing reads the file again
    to hash or parse it."""

    def __init__(self, path: str | Path, allow_unsafe_pickle: bool = False):
        self.path = Path(path)
        _check_regular_file(self.path)
        with open(self.path, "rb") as f:
            self.data = f.read()
        self.size = len(self.data)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.is_pickle = check_not_pickle(self.path, allow_unsafe_pickle, self.data)
        self._header = None

    def header(self) -> tuple[dict, int, int]:
        """``read_header`` of the bytes held: ``(header, payload_start, size)``, validated once."""
        if self._header is None:
            self._header = read_header(self.path, self.data)
        return self._header

    def payload_sha256(self) -> str:
        return payload_sha256(self.path, self.header()[1], self.data)

    def input_record(self, role: str) -> dict:
        """The run's input entry of this file (as ``run/store.hash_inputs`` writes it)."""
        return {"role": role, "path": str(self.path), "kind": "file", "size": self.size, "sha256": self.sha256}
