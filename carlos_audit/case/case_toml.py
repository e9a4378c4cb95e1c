"""Case files written by the tool (corpus-build cases, the kit's exported and reproduction
cases, derived cases): a small TOML writer for tables of scalars, lists and inline seed tables."""

from __future__ import annotations


def dump_case(data: dict) -> str:
    """A small TOML writer for case files (tables of scalars, lists and inline seed tables)."""
    import json

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    out = []
    for section, table in data.items():
        out.append(f"[{section}]")
        out += [f"{k} = {val(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)
