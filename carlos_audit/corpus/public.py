"""The public CARLoS corpus, fetched from the package index, pinned by hash.

The official ``carlos`` package (Apache-2.0) version 0.0.3 ships, in its wheel, the metrics
database of 740 SDXL LoRAs (``carlos/data/metrics_database.parquet``) and the prompt
dictionaries (``carlos/generative_prompts.py``). ``fetch_public`` gets that wheel (``pip
download``, or a wheel brought by hand), refuses any other file (sha256), reads both members
from the zip without installing or executing anything (the prompt module is parsed as literals
with ``ast``), derives the indexing and retrieval sets exactly as the module's own functions do
(their slices are read from its source), checks the indexing set against
``protocol.CARLOS_INDEXING_SHA256`` and imports the database as a corpus with the
``carlos-sdxl-vitb32`` preset. The two prompt sets are stored in the corpus header
(``prompt_sets``, ordered [category, subcategory, text] triples): ``builtin:carlos-indexing`` / ``builtin:carlos-retrieval`` and ``retrieve``
read them there.

Network: ``corpus fetch`` is an explicit download command (like ``pip download``, which it runs):
it needs no ``--allow-download``. Offline it fails in one line naming the pip command; the wheel
it downloads is cached once per machine under ``${CARLOS_AUDIT_HOME}/wheels/``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from carlos_audit.case.protocol import PUBLIC_NAME, public_corpus_dir
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_bytes_atomic, write_json_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file

PACKAGE, VERSION = "carlos", "0.0.3"
WHEEL_FILE = "carlos-0.0.3-py3-none-any.whl"
WHEEL_SHA256 = "94d2f4bd246289bfc15c13d05ef1164dede3bbc812c632081645e54a677bb2a3"
PARQUET_MEMBER = "carlos/data/metrics_database.parquet"
PROMPTS_MEMBER = "carlos/generative_prompts.py"
PIP_ARGS = ["download", f"{PACKAGE}=={VERSION}", "--no-deps", "--python-version", "3.9", "--only-binary=:all:"]
PIP_COMMAND = "pip " + " ".join(PIP_ARGS) + " -d DIR"
#: the reference functions whose slices define the two prompt sets
SET_FUNCTIONS = {"indexing": "prompts_for_indexing", "retrieval": "prompts_for_retrieval"}


def default_dest() -> Path:
    return public_corpus_dir()


def wheel_cache() -> Path:
    from carlos_audit.paths import carlos_home

    return carlos_home() / "wheels" / WHEEL_FILE


# --------------------------------------------------------------------------- the wheel


def download_wheel(timeout_s: int = 300) -> tuple[Path, dict]:
    """The pinned wheel from the package index (``pip download``), cached once per machine."""
    cached = wheel_cache()
    record = cached.with_name(cached.name + ".source.json")
    if cached.is_file() and sha256_file(cached) == WHEEL_SHA256 and record.is_file():
        return cached, dict(read_json(record), cached=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", *PIP_ARGS, "-d", tmp, "-vv"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AuditError(f"cannot download the {PACKAGE} {VERSION} wheel ({type(e).__name__}); "
                             f"bring it by hand with `{PIP_COMMAND}` and pass --wheel FILE") from None
        got = Path(tmp) / WHEEL_FILE
        if r.returncode != 0 or not got.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1][:160]
            raise AuditError(f"cannot download the {PACKAGE} {VERSION} wheel (pip: {last}); the package index may be "
                             f"unreachable: bring it by hand with `{PIP_COMMAND}` and pass --wheel FILE")
        url = re.search(r"Found link (\S+/" + re.escape(WHEEL_FILE) + r")", r.stdout + r.stderr)
        indexes = re.search(r"Looking in indexes: (.+)", r.stdout + r.stderr)
        source = {"kind": "pip download", "command": "pip " + " ".join(PIP_ARGS),
                  "url": url.group(1) if url else None, "indexes": indexes.group(1).strip() if indexes else None}
        check_wheel_hash(got)
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cached, got.read_bytes())
    write_json_atomic(record, source)
    return cached, dict(source, cached=False)


def check_wheel_hash(path: Path) -> str:
    digest = sha256_file(path)
    if digest != WHEEL_SHA256:
        raise AuditError(f"{path} is not the pinned {WHEEL_FILE}: sha256 {digest}, expected {WHEEL_SHA256}; refused")
    return digest


def read_wheel(path: Path) -> tuple[bytes, str]:
    """The Parquet database and the prompt module's source, read from the zip (nothing installed
    or executed)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.read(PARQUET_MEMBER), z.read(PROMPTS_MEMBER).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as e:
        raise AuditError(f"{path}: cannot read {PARQUET_MEMBER} / {PROMPTS_MEMBER} ({type(e).__name__})") from None


# --------------------------------------------------------------------------- the prompt module, as literals


def _literal(node, env: dict):
    """A literal expression; a bare name refers to an earlier module-level literal."""
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k, env): _literal(v, env) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, env) for e in node.elts]
    return ast.literal_eval(node)


def _set_slice(fn: ast.FunctionDef, where: str) -> slice:
    """The one slice ``v[a:b]`` a set function applies to each subcategory's list."""
    slices = [n for n in ast.walk(fn) if isinstance(n, ast.Slice)]
    if len(slices) != 1 or slices[0].step is not None:
        raise AuditError(f"{where}: {fn.name} does not take one plain slice of each subcategory; not the expected module")
    s = slices[0]
    return slice(None if s.lower is None else ast.literal_eval(s.lower), None if s.upper is None else ast.literal_eval(s.upper))


def derive_prompt_sets(source: str, where: str = PROMPTS_MEMBER) -> dict:
    """{"indexing": {...}, "retrieval": {...}} as ``prompts_for_indexing()`` and
    ``prompts_for_retrieval()`` compute them from ``prompts_by_category``."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise AuditError(f"{where}: not Python source ({e.msg})") from None
    env, functions = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                env[node.targets[0].id] = _literal(node.value, env)
            except (ValueError, TypeError, SyntaxError):
                raise AuditError(f"{where}: {node.targets[0].id} is not a literal; refusing to evaluate it") from None
        elif isinstance(node, ast.FunctionDef):
            functions[node.name] = node
    table = env.get("prompts_by_category")
    if not isinstance(table, dict) or any(f not in functions for f in SET_FUNCTIONS.values()):
        raise AuditError(f"{where}: no prompts_by_category / {', '.join(SET_FUNCTIONS.values())}; not the expected module")
    out = {}
    for name, fn in SET_FUNCTIONS.items():
        cut = _set_slice(functions[fn], where)
        out[name] = {cat: {sub: list(texts)[cut] for sub, texts in subs.items()} for cat, subs in table.items()}
    return out


# --------------------------------------------------------------------------- fetch


def fetch_public(dest=None, *, wheel=None, overwrite: bool = False) -> dict:
    """Fetch (or take ``wheel``), check, derive the prompt sets and import the public corpus."""
    from carlos_audit.case.protocol import CARLOS_INDEXING_SHA256, prompts_from_nested, prompts_sha256
    from carlos_audit.corpus.carlos import import_carlos_db

    dest = Path(dest) if dest else default_dest()
    if wheel is not None:
        path = Path(wheel)
        if not path.is_file():
            raise AuditError(f"wheel not found: {path}")
        source = {"kind": "file", "path": str(path.resolve()), "cached": False}
    else:
        path, source = download_wheel()
    check_wheel_hash(path)
    parquet, prompt_source = read_wheel(path)
    sets = derive_prompt_sets(prompt_source)
    parsed = {k: prompts_from_nested(v, f"{PROMPTS_MEMBER}:{k}") for k, v in sets.items()}
    hashes = {k: prompts_sha256(v) for k, v in parsed.items()}
    if hashes["indexing"] != CARLOS_INDEXING_SHA256:
        raise AuditError(f"the indexing set derived from {WHEEL_FILE} hashes to {hashes['indexing']}, not the "
                         f"CARLoS indexing set {CARLOS_INDEXING_SHA256}; refused")
    origin = {
        "kind": "carlos-wheel", "package": PACKAGE, "version": VERSION, "wheel": WHEEL_FILE,
        "wheel_sha256": WHEEL_SHA256, "wheel_source": source, "member": PARQUET_MEMBER,
        "sha256": sha256_bytes(parquet), "size": len(parquet),
        "prompts_member": PROMPTS_MEMBER, "prompts_member_sha256": sha256_bytes(prompt_source.encode("utf-8")),
        "prompt_sets_sha256": hashes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "metrics_database.parquet"
        src.write_bytes(parquet)
        corpus = import_carlos_db(src, dest, "carlos-sdxl-vitb32", overwrite=overwrite, name=PUBLIC_NAME,
                                  origin=origin, extra_meta={"prompt_sets": {
                                      k: [[p.category, p.subcategory, p.text] for p in v] for k, v in parsed.items()}})
    return {"corpus": str(corpus.path), "n": corpus.n, "dim": corpus.dim, "origin": origin}


def public_prompt_sets(corpus) -> dict | None:
    """The prompt sets a fetched public corpus carries ({name: [[category, subcategory, text], ...]}), or None."""
    sets = (getattr(corpus, "meta", None) or {}).get("prompt_sets")
    return sets if isinstance(sets, dict) else None

