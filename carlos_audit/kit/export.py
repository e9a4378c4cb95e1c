"""``carlos-audit export CASE_DIR --out KIT.zip``: the opposing expert's kit.

A kit is a zip a person can take to another machine to repeat the case (``reproduce.py``):

    README.md                   the steps
    kit.json                    what the kit holds: case, tool, report sha256, inputs, every file's sha256
    case.toml                   the case file, its paths relative to the kit (inputs/<role>/<name>)
    prompts.json                the prompt suite as a file ({category: {subcategory: [prompts]}})
    environment.lock            every installed distribution (name==version) when the kit was made
    results/manifest.json       the manifest with the examiner's paths replaced (see kit.json "paths")
    results/metrics.json        byte copy
    results/comparison.json     the comparison, paths replaced (when the case has one)
    results/images/...          the case's images (unless --no-images) and
    results/embeddings/...      raw CLIP features, as in the case folder
    inputs/<role>/<name>        the input files, only with --include-inputs

The zip is deterministic: entries sorted, one fixed timestamp (the run's recorded start), fixed
permissions, fixed compression. Exporting the same case folder twice gives the same bytes. No
absolute path of the examiner's machine is written: every string is rewritten through a
``PathMap`` and the finished entries are checked for leftovers (an export that would leak one
stops with an error).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

from carlos_audit.casefolder import CaseFolder
from carlos_audit.errors import AuditError
from carlos_audit.fileio import json_dumps, write_bytes_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.paths import PathMap, portable_command
from carlos_audit.records import Comparison, Manifest, Metrics

KIT_SCHEMA = "carlos-audit/kit/1"
KIT_JSON = "kit.json"
RESULT_FILES = (Manifest.FILE, Metrics.FILE, Comparison.FILE)
ZIP_EPOCH_MIN = 315532800  # 1980-01-01, the earliest time a zip entry can carry
FILE_MODE = 0o644
#: roles whose inputs are listed in the kit (the case file itself is replaced by the kit's case.toml)
INPUT_DIR = "inputs"


def kit_input_path(role: str, name: str) -> str:
    return f"{INPUT_DIR}/{role}/{name}"


def export_case(case_dir: Path, out: Path, *, include_inputs: bool = False, images: bool = True) -> dict:
    """Write the kit of a finished case folder to ``out`` (a .zip). Returns kit.json's content."""
    from carlos_audit import __version__
    from carlos_audit.kit.envlock import install_lock, installed_distributions, lock_text
    from carlos_audit.paths import carlos_home
    from carlos_audit.run.environment import git_commit

    folder = CaseFolder(Path(case_dir).resolve())
    case_dir = folder.root
    originals = _sealed(folder)
    manifest, comparison = folder.manifest, folder.comparison
    inputs = _inputs(manifest, comparison)
    pmap = _path_map(case_dir, manifest, comparison, inputs, carlos_home())

    entries: dict[str, bytes] = {}
    prompts_text, _ = _prompt_suite(manifest)
    entries["prompts.json"] = prompts_text.encode()
    entries["case.toml"] = _kit_case_toml(case_dir, inputs).encode()
    entries["environment.lock"] = lock_text(installed_distributions()).encode()
    entries["results/" + Manifest.FILE] = json_dumps(pmap.apply(manifest.to_json())).encode()
    entries["results/" + Metrics.FILE] = folder.raw(Metrics.FILE)  # a byte copy
    if comparison is not None:
        entries["results/" + Comparison.FILE] = json_dumps(pmap.apply(comparison.to_json())).encode()
    from carlos_audit.run.embed_works import kit_files

    for rel in _result_files(manifest, images) + kit_files(manifest, include_inputs):  # claimed works: run/embed_works.py
        entries[f"results/{rel}"] = (case_dir / rel).read_bytes()
    if include_inputs:
        for i in inputs:
            entries.update(_input_entries(i))

    kit = {
        "schema": KIT_SCHEMA,
        "case": manifest.case,
        "tool": manifest.tool,
        "exported_by": {"name": "carlos-audit", "version": __version__, "git_commit": git_commit()},
        "run": {k: manifest.run.get(k) for k in ("started_utc", "finished_utc", "source_date_epoch")}
        | {"command": portable_command(manifest.run.get("command", []))},
        "report": _report_hashes(folder),
        "originals": originals,
        "inputs": [{k: v for k, v in i.items() if k != "source"} | {"included": include_inputs and i["source"] is not None}
                   for i in inputs],
        "images_included": images,
        "signature": manifest.signature,
        "environment": {"lock": "environment.lock", "install_lock": install_lock(), "run": pmap.apply(manifest.environment)},
        "paths": {"replaced": sorted(set(pmap.prefixes.values())),
                  "note": "absolute paths of the examiner's machine are replaced by these names in every file of the kit"},
        "files": {name: sha256_bytes(data) for name, data in sorted(entries.items())},
    }
    entries["README.md"] = readme(kit).encode()
    kit["files"]["README.md"] = sha256_bytes(entries["README.md"])
    entries[KIT_JSON] = json_dumps(kit).encode()
    _check_no_leaks(entries, pmap)
    write_bytes_atomic(out, zip_bytes(entries, int(manifest.run.get("source_date_epoch") or 0)))
    return kit


def _report_hashes(folder: CaseFolder) -> dict:
    """The sha256 of the report's copies (filing, archive, signed archive); none is in the kit."""
    from carlos_audit.report import ARCHIVE_PDF, FILING_PDF, SIGNED_PDF

    copies = {name: folder.digest(name) for name in (FILING_PDF, ARCHIVE_PDF, SIGNED_PDF) if folder.has(name)}
    return {"file": FILING_PDF, "sha256": copies.get(FILING_PDF), "copies": copies, "included": False}


def _sealed(folder: CaseFolder) -> dict:
    """The sha256 of the result files of a finished case folder that no one edited since its
    run (manifest.json against its .sha256, metrics.json against the manifest); else a refusal."""
    folder.require_finished()
    root = folder.root
    if not folder.manifest_intact():
        raise AuditError(f"{root}/manifest.json does not match manifest.json.sha256: refusing to export a modified case (run `carlos-audit verify`)")
    originals = {name: folder.digest(name) for name in RESULT_FILES if folder.has(name)}
    if folder.manifest.results.get(Metrics.FILE) not in (None, originals[Metrics.FILE]):
        raise AuditError(f"{root}/metrics.json does not match the sha256 recorded in the manifest: refusing to export a modified case")
    return originals


def _inputs(manifest: Manifest, comparison: Comparison | None) -> list[dict]:
    """Every input of the case by role: name, kind, size, sha256, where it would lie in the kit,
    and (``source``, not written) the file on this machine when it is still there unchanged."""
    out = []
    for e in manifest.inputs:
        if e["role"] in ("casefile", "prompts"):
            continue  # replaced by the kit's case.toml and prompts.json
        name = Path(e["path"]).name
        src = Path(e["path"])
        ok = src.exists() and e.get("kind") != "folder" and src.is_file() and sha256_file(src) == e["sha256"]
        out.append({"role": e["role"], "name": name, "kind": e.get("kind", "file"), "size": e.get("size"),
                    "sha256": e["sha256"], "kit_path": kit_input_path(e["role"], name),
                    "source": str(src) if ok or (e.get("kind") == "folder" and src.is_dir()) else None})
    bm, emb = manifest.base_model, manifest.embedder
    if str(bm.get("source", "")).startswith("embedded:"):
        out.append({"role": "base_model", "name": bm["source"], "kind": "embedded", "size": None,
                    "sha256": bm.get("sha256"), "kit_path": None, "source": None})
    if str(emb.get("model", "")).startswith("embedded:") or not any(i["role"] == "embedder" for i in out):
        out.append({"role": "embedder", "name": emb.get("model") + (f" ({emb['pretrained']})" if emb.get("pretrained") else ""),
                    "kind": "embedded" if str(emb.get("model", "")).startswith("embedded:") else "named",
                    "size": None, "sha256": emb.get("sha256"), "kit_path": None, "source": None})
    corpus = comparison.corpus if comparison is not None else None
    if corpus and corpus.get("path"):
        name = Path(corpus["path"]).name
        src = Path(corpus["path"])
        out.append({"role": "corpus", "name": name, "kind": "folder", "size": None,
                    "sha256": corpus.get("corpus_sha256"), "kit_path": kit_input_path("corpus", name),
                    "source": str(src) if (src / "corpus.json").is_file() else None})
    return out


def _path_map(case_dir: Path, manifest: Manifest, comparison: Comparison | None, inputs: list[dict],
              home: Path) -> PathMap:
    pmap = PathMap()
    for e in manifest.inputs:
        p = Path(e["path"])
        if e["role"] == "casefile":
            pmap.add(p, p.name)
            pmap.add(p.parent, "<case file folder>")
        else:
            pmap.add(p, kit_input_path(e["role"], p.name))
    for i in inputs:
        if i["role"] == "corpus" and i["source"]:
            pmap.add(i["source"], i["kit_path"])
    corpus = (comparison.corpus if comparison is not None else None) or {}
    if corpus.get("path"):
        pmap.add(corpus["path"], kit_input_path("corpus", Path(corpus["path"]).name))
    pmap.add(case_dir, "<case folder>")
    pmap.add(home, "${CARLOS_AUDIT_HOME}")
    pmap.add(Path.home(), "~")
    return pmap


def _prompt_suite(manifest: Manifest) -> tuple[str, str]:
    """The prompts as run, as a nested JSON file that loads back to the same prompts_sha256."""
    from carlos_audit.case.protocol import Prompt, prompts_sha256

    nested: dict = {}
    for p in manifest.prompts:
        nested.setdefault(p["category"], {}).setdefault(p["subcategory"], []).append(p["text"])
    flat = [Prompt(p["id"], p["category"], p["subcategory"], p["text"]) for p in manifest.prompts]
    regrouped = [Prompt("", c, s, t) for c, subs in nested.items() for s, texts in subs.items() for t in texts]
    digest = prompts_sha256(regrouped)
    if digest != prompts_sha256(flat) or digest != manifest.protocol.get("prompts_sha256", digest):
        raise AuditError("the case's prompts cannot be written as a prompt suite in their original order (categories interleaved)")
    return json.dumps(nested, indent=2, ensure_ascii=False) + "\n", digest


def _kit_case_toml(case_dir: Path, inputs: list[dict]) -> str:
    """The case file as run, its paths pointing into the kit and the input hashes pinned."""
    import tomllib

    from carlos_audit.case.case_toml import dump_case

    data = tomllib.loads((case_dir / "case.toml").read_text("utf-8"))
    by_role = {i["role"]: i for i in inputs}
    data["lora"]["path"] = by_role["lora"]["kit_path"]
    data["lora"]["sha256"] = by_role["lora"]["sha256"]
    bm = data["base_model"]
    if "base_model" in by_role and by_role["base_model"]["kit_path"]:
        bm["source"] = by_role["base_model"]["kit_path"]
    if by_role.get("base_model", {}).get("kind") == "file":
        bm["sha256"] = by_role["base_model"]["sha256"]
    if "embedder" in by_role and by_role["embedder"]["kit_path"]:
        data["embedder"]["pretrained"] = by_role["embedder"]["kit_path"]
        if by_role["embedder"]["kind"] == "file":
            data["embedder"]["sha256"] = by_role["embedder"]["sha256"]
    data["protocol"]["prompts"] = "prompts.json"
    if "comparison" in data:
        data["comparison"]["loras"] = [by_role[f"comparison_lora_{k}"]["kit_path"]
                                       for k in range(1, len(data["comparison"].get("loras", [])) + 1)]
    if data.get("claimed_works"):
        from carlos_audit.run.embed_works import kit_table

        data["claimed_works"] = kit_table(data["claimed_works"], by_role)
    if "reference" in data and data["reference"].get("corpus") and "corpus" in by_role:
        data["reference"]["corpus"] = by_role["corpus"]["kit_path"]
    data.pop("output", None)
    head = ("# The case file as run, with its paths relative to this kit (inputs/<role>/<name>) and the\n"
            "# input hashes pinned. Original case file: see kit.json (\"originals\", results/manifest.json).\n\n")
    return head + dump_case(data)


def _result_files(manifest: Manifest, images: bool) -> list[str]:
    rels = set()
    near = manifest.near_copies["pairs"] if manifest.near_copies else []  # [near_copies]: the extraction arms too
    for row in list(manifest.pairs) + list(near):
        for e in row["arms"].values():
            rels.add(e["embedding"])
            if images:
                rels.add(e["image"])
    for rec in (manifest.text_features or {}).values():
        rels.add(rec["path"])
    return sorted(rels)


def _input_entries(i: dict) -> dict[str, bytes]:
    if i["source"] is None or i["kit_path"] is None:
        return {}
    src = Path(i["source"])
    if src.is_file():
        return {i["kit_path"]: src.read_bytes()}
    return {f"{i['kit_path']}/{p.relative_to(src).as_posix()}": p.read_bytes()
            for p in sorted(src.rglob("*")) if p.is_file()}


def _check_no_leaks(entries: dict[str, bytes], pmap: PathMap) -> None:
    for name, data in entries.items():
        if name.startswith(INPUT_DIR + "/") or not name.endswith((".json", ".toml", ".md", ".lock", ".txt")):
            continue
        leaks = pmap.leaks(data.decode("utf-8", errors="replace"))
        if leaks:
            raise AuditError(f"export stopped: {name} would carry a path of this machine ({len(leaks)} found)")


def zip_bytes(entries: dict[str, bytes], epoch: int) -> bytes:
    """A deterministic zip: sorted entries, one timestamp, mode 0644, deflate level 9."""
    import io
    import time

    when = time.gmtime(max(int(epoch), ZIP_EPOCH_MIN))[:6]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(entries):
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise AuditError(f"refusing to write kit entry {name!r}")
            info = zipfile.ZipInfo(name, date_time=when)
            info.create_system = 3
            info.external_attr = (0o100000 | FILE_MODE) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[name], compresslevel=9)
    return buf.getvalue()


def readme(kit: dict) -> str:
    """The kit's README: what it is, and the steps to reproduce the case."""
    c = kit["case"]
    lines = [
        f"# Reproduction kit: {c.get('exhibit', '')} — {c.get('title', '')}",
        "",
        f"Case `{c.get('id')}`, examiner {c.get('examiner')}. Made by carlos-audit {kit['tool'].get('version')}"
        f" (git commit {kit['tool'].get('git_commit') or 'unknown'}).",
        "The report is not in this kit; its sha256: "
        + ", ".join(f"{name} `{digest}`" for name, digest in kit["report"]["copies"].items()) + ".",
        "",
        "## What is inside",
        "",
        "- `case.toml`: the case file as run; its paths point into `inputs/` of this kit.",
        "- `prompts.json`: the prompt suite; `environment.lock`: the examiner's installed packages.",
        "- `results/`: manifest.json, metrics.json" + (", comparison.json" if "comparison.json" in kit["originals"] else "")
        + " and the stored " + ("images and " if kit["images_included"] else "") + "CLIP features of the case"
        + " (metrics.json is a byte copy; the others have this machine's paths replaced).",
        "- `kit.json`: the sha256 of every file in this kit, of the case folder's original files, and the inputs.",
        "",
        "## Inputs (by role)",
        "",
        "| role | name | size (bytes) | sha256 | in this kit |",
        "|---|---|---|---|---|",
    ]
    for i in kit["inputs"]:
        sha = i["sha256"] if isinstance(i["sha256"], str) else json.dumps(i["sha256"], sort_keys=True)
        lines.append(f"| {i['role']} | {i['name']} | {i['size'] if i['size'] is not None else '-'} | `{sha}` | "
                     f"{'yes, ' + i['kit_path'] if i['included'] else 'no'} |")
    lines += [
        "",
        "## Steps",
        "",
        "1. Install carlos-audit at the version above (a source checkout; `make setup`). Compare your",
        "   environment with `environment.lock`: `reproduce` lists every difference.",
        "2. Obtain the input files listed above; their sha256 must match (the LoRA first of all).",
        "3. Reproduce a sample of pairs stratified over prompt categories, or every pair:",
        "",
        "       carlos-audit reproduce KIT.zip --lora TARGET.safetensors --out repro --sample 8",
        "       carlos-audit reproduce KIT.zip --lora TARGET.safetensors --out repro --all",
        "",
        "   (add `--comparison FILE` for each comparison LoRA, `--corpus DIR` for the reference corpus,",
        "   `--base SOURCE` / `--embedder FILE` when the base model or embedder is a local file).",
        "4. Read `repro/reproduction.pdf` (and `repro/reproduction.json`). Exit status: 0 identical,",
        "   4 within tolerance, 5 different; inputs whose sha256 differ are refused before generating.",
        "",
    ]
    return "\n".join(lines)
