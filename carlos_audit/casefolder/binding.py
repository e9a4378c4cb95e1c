"""What a case folder's run is bound to: the inputs its first attempt used (``inputs.json``).

The first attempt of a run records the sha256 of every input it read (the LoRA, the comparison
LoRAs, the prompt file, local base-model and embedder files, the claimed works: the intake's
hashes), the hash of the prompt set (a builtin suite too), and, once the models are loaded, the
loaded base model's and embedder's sha256 and the parts of the reproducibility key
(case/signature.py: ``key_params``, the batch size, the environment that changes bits). A resume
compares what it read with this record before it generates anything, and a difference is
refused in one line naming the input (``--force`` starts over): the units already in the folder
were made from the recorded inputs, and a folder never mixes units of two inputs.

``bind`` is the one comparison: a record without its models part (a run stopped while loading)
gains it, unless units were generated without one (a folder of an earlier carlos-audit, whose
units cannot be tied to any input: refused the same way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from carlos_audit.errors import AuditError
from carlos_audit.fileio import json_dumps
from carlos_audit.records import OPTIONAL, Record

BINDING_SCHEMA = "carlos-audit/inputs/1"


@dataclass
class InputBinding(Record):
    """inputs.json: the inputs the run in this case folder was started with."""

    FILE: ClassVar[str] = "inputs.json"
    SCHEMA: ClassVar[str] = BINDING_SCHEMA

    inputs: dict  # role -> sha256, every input the intake hashed but the case file (run.json binds it)
    prompts_sha256: str  # case/protocol.prompts_sha256 of the prompt set as parsed
    models: dict | None = field(default=None, metadata=OPTIONAL)  # {base_model, embedder}: sha256 as loaded
    key: dict | None = field(default=None, metadata=OPTIONAL)  # {params, batch_size, environment}
    schema: str = BINDING_SCHEMA

    def differences(self, now: "InputBinding") -> list[str]:
        """What differs between this record and ``now``, each as 'NAME: X… recorded, Y… now'; a
        part ``now`` does not have yet (the models before loading) is not compared."""
        roles = sorted(set(self.inputs) | set(now.inputs))
        out = [f"{role}: sha256 {_short(self.inputs.get(role))} recorded, {_short(now.inputs.get(role))} now"
               for role in roles if self.inputs.get(role) != now.inputs.get(role)]
        if now.prompts_sha256 != self.prompts_sha256:
            out.append(f"prompt set: sha256 {_short(self.prompts_sha256)} recorded, {_short(now.prompts_sha256)} now")
        for part in ("models", "key"):
            then, later = getattr(self, part), getattr(now, part)
            if then is not None and later is not None:
                out += [f"{'reproducibility key ' if part == 'key' else ''}{name}: {_value(then, name)} recorded, "
                        f"{_value(later, name)} now" for name in _differing(then, later)]
        return out


def _short(sha) -> str:
    return "none" if sha is None else f"{str(sha)[:12]}…"


def _value(obj: dict, dotted: str) -> str:
    """The leaf ``dotted`` of a JSON object, short (a sha256 cut to 12 characters)."""
    for k in dotted.split("."):
        obj = obj.get(k) if isinstance(obj, dict) else None
    text = json.dumps(obj)
    return f"{text[:13]}…" if len(text) > 24 else text


def _plain(value):
    """JSON as written and read back (tuples as lists), so a fresh record equals a stored one."""
    return json.loads(json_dumps(value))


def _differing(a: dict, b: dict, path: str = "") -> list[str]:
    """Dotted names of the leaves where two JSON objects differ (``environment.packages.torch``)."""
    a, b = _plain(a), _plain(b)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [path or "value"]
    return [d for k in sorted(set(a) | set(b))
            for d in _differing(a.get(k), b.get(k), f"{path}.{k}" if path else k)]


def read_binding(root: Path) -> InputBinding | None:
    """The folder's binding record, None when it has none; an unreadable one is refused in one line."""
    path = Path(root) / InputBinding.FILE
    if not path.is_file():
        return None
    try:
        return InputBinding.read(root)
    except (OSError, UnicodeDecodeError) as e:
        raise AuditError(f"{path} cannot be read ({e}); pass --force to start the run over") from None


def has_units(root: Path) -> bool:
    """Whether any unit record was written in the case folder."""
    return any((Path(root) / "units").glob("*/b*.json"))


def bind(root: Path, now: InputBinding) -> list[str]:
    """Compare ``now`` with the folder's record and write it where there is none (or where the
    record lacks the models part ``now`` has). Returns what differs (nothing written then)."""
    then = read_binding(root)
    if then is None and has_units(root):
        return ["no inputs recorded for the units already generated (made by an earlier carlos-audit)"]
    if then is not None:
        diffs = then.differences(now)
        if diffs:
            return diffs
        if then.models is not None or now.models is None:
            return []
        if has_units(root):
            return ["no models recorded for the units already generated"]
    now.write(root)
    return []
