"""Prompt suites, seeds and the ordered list of pairs a profile generates.

A *prompt suite* is an ordered list of ``Prompt`` (id, category, subcategory, text).
A *pair* is one (prompt, seed): it yields one image per arm (base, LoRA) from the
same initial noise. Pairs are enumerated prompt-major (all seeds of prompt 1, then
prompt 2, ...) and cut into consecutive batches of ``batch_size``; that layout is
part of the protocol because batching changes low bits of the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tomllib

from carlos_audit.errors import AuditError
from carlos_audit.hashing import sha256_json

BUILTIN_SUITES = ("standard", "demo", "retrieval")
#: Builtin suites that come from the fetched public CARLoS data (``corpus fetch carlos-public``),
#: name -> the set of the fetched prompts file.
FETCHED_SUITES = {"carlos-indexing": "indexing", "carlos-retrieval": "retrieval"}
#: How initial noise is drawn: one CPU generator per image seeded with the pair's seed, or (the
#: CARLoS reference) one CPU generator per batch seeded with the batch's first seed, the batch being
#: one prompt's consecutive seeds generated as ``num_images_per_prompt``.
SEED_MODES = ("per-image", "carlos-batch")

#: prompts_sha256 of the upstream CARLoS indexing set (carlos_prompts.json, ``indexing``),
#: as computed by :func:`prompts_sha256`; a test checks it against ../shared/ when present.
CARLOS_INDEXING_SHA256 = "9fa955a5dadedf8a4d68e43bd05519c8bc839da2b5b524455260255cb7bca228"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    subcategory: str
    text: str


@dataclass(frozen=True)
class Pair:
    prompt: Prompt
    seed: int
    batch: int  # index of the batch this pair is generated in
    position: int  # position inside that batch

    @property
    def id(self) -> str:
        return f"{self.prompt.id}_s{self.seed}"


def prompts_from_nested(data, origin: str) -> list[Prompt]:
    """{category: {subcategory: [prompt, ...]}} -> prompts, ids p001.. in file order."""
    if not isinstance(data, dict) or not data:
        raise AuditError(f"{origin}: expected {{category: {{subcategory: [prompts]}}}}")
    out: list[Prompt] = []
    for cat, subs in data.items():
        if isinstance(subs, list):  # {category: [prompts]} is accepted too
            subs = {cat: subs}
        if not isinstance(subs, dict):
            raise AuditError(f"{origin}: category {cat!r} must map subcategories to lists of prompts")
        for sub, texts in subs.items():
            if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
                raise AuditError(f"{origin}: {cat}/{sub} must be a list of non-empty strings")
            for t in texts:
                out.append(Prompt("", str(cat), str(sub), t.strip()))
    return _number(out)


def prompts_from_triples(triples, origin: str) -> list[Prompt]:
    """[[category, subcategory, text], ...] (the order JSON keeps) -> prompts, ids p001.. in order."""
    if not isinstance(triples, list) or not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t) for t in triples):
        raise AuditError(f"{origin}: expected a list of [category, subcategory, prompt] triples")
    return _number([Prompt("", c, s, t) for c, s, t in triples])


def _number(prompts: list[Prompt]) -> list[Prompt]:
    width = max(3, len(str(len(prompts))))
    return [Prompt(f"p{i + 1:0{width}d}", p.category, p.subcategory, p.text) for i, p in enumerate(prompts)]


def load_prompts(spec: str, base_dir: Path | None = None) -> tuple[list[Prompt], dict]:
    """Load a prompt suite from ``builtin:NAME`` or a .txt/.json/.toml file.

    Returns the prompts and a description of the source (kind, name or path, sha256 of the
    file when it is one). A CARLoS-style JSON with an ``indexing`` key selects that set.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name in FETCHED_SUITES:
            return load_fetched_suite(name)
        if name not in BUILTIN_SUITES:
            raise AuditError(
                f"unknown builtin prompt suite {name!r}; allowed: "
                + ", ".join(f"builtin:{n}" for n in (*BUILTIN_SUITES, *FETCHED_SUITES))
            )
        text = resources.files("carlos_audit.case").joinpath(f"prompts/{name}.json").read_text("utf-8")
        prompts = prompts_from_nested(json.loads(text), spec)
        return prompts, {"kind": "builtin", "name": spec}
    path = Path(spec)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise AuditError(f"prompt file not found: {path}")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = [ln.strip() for ln in raw.decode("utf-8").splitlines()]
            texts = [ln for ln in lines if ln and not ln.startswith("#")]
            if not texts:
                raise AuditError(f"{path}: no prompts (one prompt per line, # for comments)")
            prompts = _number([Prompt("", "default", "default", t) for t in texts])
        elif suffix == ".json":
            data = json.loads(raw.decode("utf-8"))
            if isinstance(data, dict) and "indexing" in data:
                data = data["indexing"]
            if isinstance(data, list):
                data = {"default": {"default": data}}
            prompts = prompts_from_nested(data, str(path))
        elif suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
            if "indexing" in data:
                data = data["indexing"]
            prompts = prompts_from_nested(data, str(path))
        else:
            raise AuditError(f"{path}: prompt files must be .txt, .json or .toml")
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise AuditError(f"{path}: cannot parse prompt file ({type(e).__name__}: {e})") from None
    from carlos_audit.hashing import sha256_bytes

    return prompts, {"kind": "file", "path": str(path), "sha256": sha256_bytes(raw)}


#: ``corpus fetch carlos-public`` (corpus/public.py) stores the public corpus in the tool's home,
#: its header (corpus.json) holding the two prompt sets derived from the official wheel
PUBLIC_NAME = "carlos-public"
FETCH_COMMAND = "carlos-audit corpus fetch carlos-public"
FETCHED_HEADER = "corpus.json"


def public_corpus_dir() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "corpora" / PUBLIC_NAME


def load_fetched_set(which: str, path: Path | None = None):
    """(prompts, header path, header sha256) of a fetched corpus's ``indexing`` / ``retrieval`` set."""
    from carlos_audit.fileio import read_json
    from carlos_audit.hashing import sha256_file

    path = path or public_corpus_dir() / FETCHED_HEADER
    if not path.is_file():
        raise AuditError(f"the public CARLoS prompts are not fetched yet ({path} is missing); run `{FETCH_COMMAND}`")
    data = read_json(path).get("prompt_sets") or {}
    if which not in data:
        raise AuditError(f"{path} holds no {which!r} prompt set; run `{FETCH_COMMAND} --overwrite`")
    return prompts_from_triples(data[which], f"{path}:{which}"), path, sha256_file(path)


def load_fetched_suite(name: str) -> tuple[list[Prompt], dict]:
    """``builtin:carlos-indexing`` / ``builtin:carlos-retrieval``: from the prompts file that
    ``corpus fetch carlos-public`` derived from the official wheel."""
    prompts, path, digest = load_fetched_set(FETCHED_SUITES[name])
    return prompts, {"kind": "builtin", "name": f"builtin:{name}", "path": str(path), "sha256": digest}


def load_prompt_set(path: str | Path, which: str) -> list[Prompt]:
    """Load the ``indexing`` or ``retrieval`` set of a CARLoS-style prompts JSON."""
    data = json.loads(Path(path).read_text("utf-8"))
    if which not in data:
        raise AuditError(f"{path}: has no {which!r} prompt set")
    return prompts_from_nested(data[which], f"{path}:{which}")


def prompts_sha256(prompts: list[Prompt]) -> str:
    """Hash of the protocol's prompts: ordered (category, subcategory, text) triples."""
    return sha256_json([[p.category, p.subcategory, p.text] for p in prompts])


def resolve_seeds(spec) -> list[int]:
    """A list of ints, or {count = N, start = S}."""
    if isinstance(spec, dict):
        count, start = spec.get("count"), spec.get("start", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise AuditError("protocol.seeds.count must be a positive integer")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise AuditError("protocol.seeds.start must be a non-negative integer")
        return list(range(start, start + count))
    return list(spec)


def enumerate_pairs(prompts: list[Prompt], seeds: list[int], batch_size: int) -> list[Pair]:
    pairs = []
    for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds):
        pairs.append(Pair(p, s, i // batch_size, i % batch_size))
    return pairs


def batches(pairs: list[Pair]) -> list[list[Pair]]:
    out: dict[int, list[Pair]] = {}
    for pr in pairs:
        out.setdefault(pr.batch, []).append(pr)
    return [out[k] for k in sorted(out)]
