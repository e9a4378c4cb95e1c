"""Typed case-file sections, generated from a table of keys.

``casefile.SCHEMA`` states every key of every case-file table with its type and default, and
``sequential.KEYS`` those of ``[protocol.sequential]``. ``section_type`` turns one such table into
a frozen dataclass (one field per key, in the table's order, annotated with the key's Python
type), so that a ``Case``'s sections are read as ``case.protocol.steps``, and a key that is not in
the table is an ``AttributeError`` instead of a silent ``None``.

The values are the validated ones (``casefile.parse_case``): defaults filled in, numbers made
float where the table says so. Lists stay lists (frozen is the section, not its lists).
``to_dict()`` gives the table back as a plain dict in the table's order (what the manifest and
the signature record). ``section["key"]`` and ``section.get("key")`` still read a key: the
report's ``[report]``/``[expert]`` tables and tests use them; package code reads attributes
(tests/test_house_rules.py checks it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

#: casefile.SCHEMA's type names -> Python annotations
_PY_TYPES: dict[str, Any] = {
    "string": str, "integer": int, "number": float, "boolean": bool,
    "list of strings": list[str], "list of numbers": list[float], "seeds": list[int],
}


class SectionSpec:
    """Base of the generated section types (frozen dataclasses)."""

    def to_dict(self) -> dict:
        """The section as a plain dict, keys in the table's order; nested sections as dicts."""
        return dataclasses.asdict(self)

    #: key -> section type of a sub-table ([protocol.sequential])
    nested_types: dict[str, type] = {}

    @classmethod
    def from_dict(cls, values: dict) -> "SectionSpec":
        """A section from validated values (every key of the table present, no other); a
        sub-table given as a dict becomes its section type."""
        return cls(**{k: cls.nested_types[k].from_dict(v) if k in cls.nested_types and isinstance(v, dict) else v
                      for k, v in values.items()})

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default


def _class_name(section: str) -> str:
    return "".join(part.capitalize() for part in section.split("_")) + "Spec"


def section_type(section: str, keys: dict[str, tuple[Any, Any]], required: tuple[str, ...] = (),
                 nested: dict[str, type] | None = None, module: str = __name__) -> type:
    """A frozen dataclass for one table: ``keys`` maps key -> (Python type, default), a key in
    ``required`` has no default, a key in ``nested`` holds that section type (or None).
    ``module``: where the class is bound to its name (``<Section>Spec``), so that it pickles."""
    nested = dict(nested or {})
    fields = []
    for key, (py_type, default) in keys.items():
        kind = nested.get(key, py_type)
        if key in required:
            fields.append((key, kind))
            continue
        if default is None:
            kind = Optional[kind]
        if isinstance(default, list):
            spec = dataclasses.field(default_factory=lambda d=default: list(d))
        else:
            spec = dataclasses.field(default=default)
        fields.append((key, kind, spec))
    namespace = {"__doc__": f"The validated [{section}] table of a case file.", "nested_types": nested}
    cls = dataclasses.make_dataclass(_class_name(section), fields, bases=(SectionSpec,), frozen=True, kw_only=True,
                                     namespace=namespace)
    cls.__module__ = module
    return cls


def schema_types(schema: dict[str, dict[str, tuple]], nested: dict[str, dict[str, type]], module: str) -> dict[str, type]:
    """One section type per table of ``schema`` (casefile.SCHEMA: key -> (type name, required,
    default)); ``nested[section][key]``: the section type of a sub-table; ``module`` binds them."""
    out = {}
    for section, keys in schema.items():
        table = {k: (_PY_TYPES.get(kind, dict), default) for k, (kind, _required, default) in keys.items()}
        required = tuple(k for k, (_kind, req, _default) in keys.items() if req)
        out[section] = section_type(section, table, required, nested.get(section), module)
    return out
