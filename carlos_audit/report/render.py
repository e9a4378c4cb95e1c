"""The evidentiary PDF: read a finished case folder, build the report's context, render it.

    render_report(case_dir)
        read       manifest.json, metrics.json, comparison.json (optional)
        check      every image in the manifest is in the case folder with its recorded sha256
        draw       figures/*.svg (matplotlib), figures/sheets/*.jpg (thumbnails, one per prompt)
        sections   arms and profiles (2.5), further indicators from metrics.json ``indicators`` (3A),
                   head-to-head from comparison.json ``head_to_head`` (5A, with triptychs of the
                   comparison arm's images, hash-checked); each omitted when its data is absent
        render     templates/report.html.j2 (Jinja2, autoescape) -> HTML -> PDF/A-3b (weasyprint)
        write      report.pdf and report.pdf.sha256 (sha256sum format)

Nothing is generated and torch is never imported: the report is a pure function of the stored
results, so re-rendering the same case folder gives the same bytes. The document date is the
run's recorded start (manifest run.source_date_epoch), never the time of rendering.

Text that comes from the LoRA file, the prompts or a corpus is hostile until shown otherwise:
Jinja2 escapes all of it, and weasyprint gets a URL fetcher that serves only files inside the
case folder and the templates folder, and refuses everything else (http, https, other files).
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

from carlos_audit import __version__
from carlos_audit.errors import AuditError
from carlos_audit.fileio import read_json, write_bytes_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes, sha256_file
from carlos_audit.kit.paths import portable_command
from carlos_audit.report import figures

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
KNOWN_ERRORS = Path(__file__).resolve().parent / "known_errors.json"
TEMPLATE = "report.html.j2"
CASE_URL = "file:///carlos-audit-case/"            # virtual roots: see CaseOnlyFetcher
TEMPLATES_URL = "file:///carlos-audit-templates/"
STYLESHEET = "report.css"

N_SAMPLE_PROMPTS = 8      # body grid 1: the first seed of the first N prompts (fixed in advance)
N_EXTREMES = 4            # body grid 2: the N largest and N smallest effects
N_TOP_PROMPTS = 5         # results table: prompts with the largest and smallest strength
METADATA_MAX_KEYS = 60    # self-reported metadata shown in the body (all of it is in manifest.json)
METADATA_MAX_CHARS = 400


# ----------------------------------------------------------------------------- the URL fetcher


@functools.lru_cache(maxsize=1)
def _url_fetcher_class():
    from weasyprint.urls import FatalURLFetchingError, URLFetcher, URLFetcherResponse

    class RefusedFetch(FatalURLFetchingError):
        """A resource outside the case and templates folders: rendering stops."""

    class CaseOnlyFetcher(URLFetcher):
        """Serves files inside the allowed folders (and data: URIs); refuses anything else.

        The document only knows the folders by virtual URLs (``file:///carlos-audit-case/...``,
        ``file:///carlos-audit-templates/...``), so no real path of this machine enters the PDF
        (weasyprint names images after their URL) and the same case renders to the same bytes
        wherever its folder lies. Weasyprint asks this object for every stylesheet, image and
        attachment it loads; refusing raises an error that stops the rendering, so a report can
        never be made with a resource fetched from the network or from elsewhere on the machine.
        """

        MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".svg": "image/svg+xml", ".css": "text/css"}

        def __init__(self, roots: dict[str, Path]):
            super().__init__(allowed_protocols=("file", "data"), allow_redirects=False, fail_on_errors=False)
            self.roots = {name: Path(r).resolve() for name, r in roots.items()}
            self.served: list[str] = []
            self.refused: list[str] = []

        def resolve(self, url: str) -> Path | None:
            """The real file behind a virtual file URL, or None when it is not allowed."""
            parts = PurePosixPath(url2pathname(urlsplit(url).path)).parts
            if len(parts) < 3 or parts[0] != "/" or parts[1] not in self.roots:
                return None
            root = self.roots[parts[1]]
            path = root.joinpath(*parts[2:]).resolve()  # follows symlinks and ..: must stay inside
            if not path.is_relative_to(root) or not path.is_file() or path.suffix.lower() not in self.MIME:
                return None
            return path

        def fetch(self, url, headers=None):
            scheme = urlsplit(url).scheme.lower()
            if scheme == "data":
                return super().fetch(url, headers)
            path = self.resolve(url) if scheme == "file" else None
            if path is None:
                self.refused.append(url)
                raise RefusedFetch(f"refused to fetch {url[:200]!r}: only files inside the case folder and the templates folder are served")
            self.served.append(url)
            return URLFetcherResponse(url, body=path.read_bytes(), headers={"Content-Type": self.MIME[path.suffix.lower()]})

    return CaseOnlyFetcher, RefusedFetch


def make_url_fetcher(case_dir: Path, templates_dir: Path = TEMPLATES_DIR):
    """The report's URL fetcher: CASE_URL serves the case folder, TEMPLATES_URL the templates."""
    cls, _ = _url_fetcher_class()
    return cls({CASE_URL.split("/")[3]: case_dir, TEMPLATES_URL.split("/")[3]: templates_dir})


# ----------------------------------------------------------------------------- small helpers


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seeds_text(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]} to {seeds[-1]} ({len(seeds)} seeds)"
    return ", ".join(str(s) for s in seeds) + f" ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})"


def _flatten(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, value text) rows, for key/value tables."""
    rows = []
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            rows += _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        rows.append((prefix, ", ".join(str(x) for x in obj) if obj else "(none)"))
    else:
        rows.append((prefix, "(none)" if obj is None else str(obj)))
    return rows


def _case_file(case_dir: Path, rel: str) -> Path:
    """A path recorded in the manifest, refused if it leaves the case folder."""
    p = (case_dir / rel).resolve()
    if not p.is_relative_to(case_dir):
        raise AuditError(f"manifest.json names {rel!r}, which is outside the case folder {case_dir}")
    return p


def _short(h: str | None) -> str:
    return (h or "")[:12]


def _clip(text, limit: int) -> tuple[str, bool]:
    text = str(text)
    return (text, False) if len(text) <= limit else (text[:limit], True)


# ----------------------------------------------------------------------------- image evidence


def image_evidence(case_dir: Path, manifest: dict, metrics: dict, body_ids: set[str]) -> dict:
    """Check every image against its recorded hash; write one contact sheet per prompt (chunks
    of SHEET_MAX_COLUMNS seeds) and display copies for the body pairs.

    Images are read one prompt at a time, so memory stays bounded whatever the case size.
    """
    norms = {p["pair_id"]: p["diff_norm"] for p in metrics.get("per_pair", [])}
    groups: dict[str, list[dict]] = {}
    for row in manifest["pairs"]:
        groups.setdefault(row["prompt_id"], []).append(row)

    mismatches, display, sheets_by_prompt = [], {}, {}
    sheet_no = 0
    for prompt_id, rows in groups.items():
        sheets = []
        for start in range(0, len(rows), figures.SHEET_MAX_COLUMNS):
            chunk = rows[start:start + figures.SHEET_MAX_COLUMNS]
            columns = []
            for row in chunk:
                data = {}
                for arm in ("base", "lora"):
                    rec = row["arms"][arm]
                    path = _case_file(case_dir, rec["image"])
                    if not path.is_file():
                        raise AuditError(f"case folder {case_dir} lacks {rec['image']} (pair {row['pair_id']}); the report needs every image the manifest records")
                    data[arm] = path.read_bytes()
                    actual = sha256_bytes(data[arm])
                    if actual != rec["image_sha256"]:
                        mismatches.append({"pair_id": row["pair_id"], "arm": arm, "path": rec["image"],
                                           "recorded": rec["image_sha256"], "actual": actual})
                    if row["pair_id"] in body_ids:
                        copy = figures.display_copy(data[arm])
                        rel = rec["image"]
                        if copy is not None:
                            rel = f"figures/display/{len(display):05d}_{arm}.png"
                            write_bytes_atomic(case_dir / rel, copy)
                        display[(row["pair_id"], arm)] = quote(rel)
                columns.append((data["base"], data["lora"]))
            sheet_no += 1
            rel = f"figures/sheets/sheet_{sheet_no:05d}.jpg"
            write_bytes_atomic(case_dir / rel, figures.contact_sheet(columns))
            n = len(chunk)
            width_mm = min(178.0, n * 22.0)
            sheets.append({"src": rel, "width_mm": f"{width_mm:.1f}",
                           "seeds": [r["seed"] for r in chunk]})
        sheets_by_prompt[prompt_id] = sheets

    n_images = 2 * len(manifest["pairs"])
    return {"mismatches": mismatches, "display": display, "sheets": sheets_by_prompt, "n_images": n_images,
            "norms": norms}


# ----------------------------------------------------------------------------- context


def select_body_pairs(manifest: dict, metrics: dict) -> tuple[list[str], list[str], list[str]]:
    """The pairs shown full size: a sample fixed in advance (first seed of the first prompts),
    and the largest and smallest effects (by ||d_i||)."""
    first_of_prompt = {}
    for row in manifest["pairs"]:
        first_of_prompt.setdefault(row["prompt_id"], row["pair_id"])
    sample = list(first_of_prompt.values())[:N_SAMPLE_PROMPTS]
    ranked = sorted(metrics.get("per_pair", []), key=lambda p: (-p["diff_norm"], p["pair_id"]))
    largest = [p["pair_id"] for p in ranked[:N_EXTREMES]]
    smallest = [p["pair_id"] for p in reversed(ranked[-N_EXTREMES:]) if p["pair_id"] not in largest]
    return sample, largest, smallest


def hash_table(rows: list[dict], norms: dict) -> str:
    """The seed manifest of one prompt as fixed-width text (two lines per pair: base, LoRA).

    Plain preformatted text rather than an HTML table: weasyprint lays out 4,480 table rows
    three times slower, and the text copies out of the PDF exactly as printed."""
    w = max([len("pair")] + [len(str(r["pair_id"])) for r in rows])
    lines = [f"{'pair':<{w}}  {'seed':>5}  arm   image sha256{' ' * 52}  ||d||"]
    for r in rows:
        norm = norms.get(r["pair_id"])
        lines.append(f"{r['pair_id']:<{w}}  {r['seed']:>5}  base  {r['arms']['base']['image_sha256']:<64}  "
                     + ("n/a" if norm is None else f"{norm:.4f}"))
        lines.append(f"{'':<{w}}  {'':>5}  LoRA  {r['arms']['lora']['image_sha256']}")
    return "\n".join(lines)


def _pair_card(row: dict, prompt_text: str, evidence: dict) -> dict:
    text, cut = _clip(prompt_text, 110)
    return {
        "pair_id": row["pair_id"], "prompt_id": row["prompt_id"], "seed": row["seed"],
        "category": row.get("category", ""), "prompt": text + ("…" if cut else ""),
        "diff_norm": evidence["norms"].get(row["pair_id"]),
        "base_src": evidence["display"][(row["pair_id"], "base")],
        "lora_src": evidence["display"][(row["pair_id"], "lora")],
        "base_hash": _short(row["arms"]["base"]["image_sha256"]),
        "lora_hash": _short(row["arms"]["lora"]["image_sha256"]),
    }


def _self_reported(lora: dict) -> dict:
    inspection = lora.get("inspection")
    if not isinstance(inspection, dict):
        return {"present": False, "has_metadata": False, "rows": [], "n_keys": 0, "facts": []}
    meta = inspection.get("metadata")
    rows = []
    if isinstance(meta, dict):
        for k in sorted(meta, key=str)[:METADATA_MAX_KEYS]:
            key, _ = _clip(k, 120)
            value, cut = _clip(meta[k] if isinstance(meta[k], str) else json.dumps(meta[k], ensure_ascii=False), METADATA_MAX_CHARS)
            rows.append({"key": key, "value": value, "truncated": cut})
    facts = [(label, inspection.get(key)) for label, key in (
        ("format", "format"), ("detected architecture", "architecture"), ("modules", "module_count"),
        ("parameters", "parameter_count"), ("payload sha256 (tensors only)", "payload_sha256"),
        ("AutoV2 short hash", "autov2"), ("claimed base model hash", "claimed_base_model_hash"),
        ("base model hash check", "base_model_hash_check")) if inspection.get(key) is not None]
    ranks = (inspection.get("rank_summary") or {}).get("distinct")
    if ranks:
        facts.append(("ranks", ", ".join(str(r) for r in ranks)))
    hints = inspection.get("trigger_word_hints")
    if hints:
        shown = []
        for h in hints[:20]:
            if isinstance(h, dict):
                shown.append(f"“{_clip(h.get('text', ''), 120)[0]}” ({h.get('count', '?')}× in {h.get('source', '?')})")
            else:
                shown.append(f"“{_clip(h, 120)[0]}”")
        facts.append(("trigger word hints (SELF-REPORTED)", "; ".join(shown)))
    return {"present": True, "has_metadata": isinstance(meta, dict) and bool(meta), "rows": rows,
            "n_keys": len(meta) if isinstance(meta, dict) else 0, "facts": facts}


def _comparison(comparison: dict | None) -> dict:
    if not comparison or not (comparison.get("corpus") or comparison.get("target")):
        return {"configured": False}  # no file, or only ``head_to_head`` (no reference corpus)
    corpus = comparison.get("corpus") or {}
    target = comparison.get("target") or {}
    neighbours = []
    for n in target.get("neighbours") or []:
        name, cut = _clip(n.get("name", ""), 80)
        neighbours.append({"id": _clip(n.get("id", ""), 80)[0], "name": name + ("…" if cut else ""),
                           "similarity": n.get("similarity"), "strength": n.get("strength"),
                           "consistency": n.get("consistency")})
    hashes = corpus.get("corpus_sha256") if isinstance(corpus.get("corpus_sha256"), dict) else {}
    return {
        "configured": True,
        "name": _clip(corpus.get("name") or "(unnamed)", 120)[0],
        "n": corpus.get("n"),
        "excluded_row": corpus.get("excluded_row"),
        "unverifiable_fields": [str(f) for f in corpus.get("unverifiable_fields") or []],
        "allow_incompatible": bool(corpus.get("allow_incompatible")),
        "hash_rows": [(k, v) for k, v in sorted(hashes.items()) if v],
        "signature": corpus.get("signature"),
        "signature_rows": _flatten(corpus.get("signature")) if isinstance(corpus.get("signature"), dict) else [],
        "compatible": corpus.get("compatible", True) is not False,
        "differing_fields": [str(f) for f in corpus.get("differing_fields") or []],
        "strength_percentile": target.get("strength_percentile"),
        "consistency_percentile": target.get("consistency_percentile"),
        "neighbours": neighbours,
        "has_points": bool((comparison.get("corpus_points") or {}).get("strength")),
    }


# ----------------------------------------------------------------------------- beyond the paper


N_LABELS_SHOWN = 10       # effect labels listed (all are in metrics.json)
N_MODULE_NAMES = 5        # module names listed when two LoRA files differ in their modules


def _num_or_none(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _pair_ci(ci) -> list[float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num_or_none(v) is not None for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def _indicators(metrics: dict) -> dict:
    """The indicators beyond the paper (metrics.json ``indicators``), each None when absent."""
    ind = metrics.get("indicators")
    out = {"present": False, "dose": None, "trigger": None, "override": None, "scope": None, "labels": None}
    if not isinstance(ind, dict):
        return out

    dr = ind.get("dose_response")
    if isinstance(dr, dict) and dr.get("points"):
        s1 = _num_or_none(dr.get("strength_at_scale_1"))
        points = []
        for p in sorted(dr["points"], key=lambda p: float(p["scale"])):
            s = _num_or_none(p.get("strength"))
            points.append({"scale": float(p["scale"]), "strength": s, "strength_ci": _pair_ci(p.get("strength_ci")),
                           "consistency": _num_or_none(p.get("consistency")),
                           "consistency_ci": _pair_ci(p.get("consistency_ci")),
                           "share": (s / s1 * 100.0) if (s is not None and s1) else None})
        out["dose"] = {"points": points, "strength_at_scale_1": s1,
                       "half_strength_scale": _num_or_none(dr.get("half_strength_scale")),
                       "increasing": bool(dr.get("strength_strictly_increasing")),
                       "definition": str(dr.get("definition", ""))}

    td = ind.get("trigger_dependence")
    if isinstance(td, dict):
        words = [_clip(w, 60)[0] for w in (td.get("trigger_words") or [])][:20]
        out["trigger"] = {"ratio": _num_or_none(td.get("ratio")), "ratio_ci": _pair_ci(td.get("ratio_ci")),
                          "strength_with": _num_or_none(td.get("strength_with")),
                          "strength_without": _num_or_none(td.get("strength_without")),
                          "words": words, "note": td.get("note"), "definition": str(td.get("definition", ""))}

    po = ind.get("prompt_override")
    if isinstance(po, dict) and _num_or_none(po.get("mean")) is not None:
        vals = [float(v) for v in po.get("per_pair") or [] if _num_or_none(v) is not None]
        ci = _pair_ci(po.get("ci"))
        out["override"] = {"mean": float(po["mean"]), "ci": ci, "n": len(vals),
                           "n_negative": sum(v < 0 for v in vals),
                           "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                           "ci_excludes_zero": bool(ci and (ci[1] < 0 or ci[0] > 0)),
                           "definition": str(po.get("definition", ""))}

    sc = ind.get("scope")
    if isinstance(sc, dict):
        per = sc.get("per_category_strength") or {}
        total = sum(float(v) for v in per.values() if _num_or_none(v) is not None)
        rows = [{"name": _clip(k, 60)[0], "strength": _num_or_none(v),
                 "share": (float(v) / total * 100.0) if (total > 0 and _num_or_none(v) is not None) else None}
                for k, v in sorted(per.items(), key=lambda kv: str(kv[0]))]
        out["scope"] = {"concentration": _num_or_none(sc.get("concentration")), "ci": _pair_ci(sc.get("ci")),
                        "rows": rows, "note": sc.get("note"), "definition": str(sc.get("definition", ""))}

    el = ind.get("effect_labels")
    if isinstance(el, dict):
        top = [{"label": _clip(r.get("label", ""), 60)[0], "group": _clip(r.get("group", ""), 40)[0],
                "score": _num_or_none(r.get("score"))} for r in (el.get("top") or [])[:N_LABELS_SHOWN] if isinstance(r, dict)]
        out["labels"] = {"top": top, "n_top": len(el.get("top") or []), "vocabulary_size": el.get("vocabulary_size"),
                         "note": el.get("note"), "definition": str(el.get("definition", ""))}

    out["present"] = any(out[k] is not None for k in ("dose", "trigger", "override", "scope", "labels"))
    return out


def _profile_purpose(name: str, adapters: dict) -> str:
    if name == "main":
        return "the CARLoS profile (sections 1 and 3)"
    if name.startswith("scale:"):
        return f"dose-response at LoRA scale {name.split(':', 1)[1]}"
    if name == "trigger:with":
        return "trigger dependence: trigger words in the prompt"
    if name == "trigger:without":
        return "trigger dependence: no trigger words in either arm"
    if name.startswith("comparison:"):
        adapter = name.split(":", 1)[1]
        return f"head-to-head with {adapters.get(adapter, adapter)}"
    return ""


def _arms_plan(manifest: dict) -> dict:
    """Method: the arms generated and the profiles (base arm, LoRA arm) that use them."""
    proto = manifest.get("protocol") or {}
    arms = proto.get("arms") or {}
    profiles = proto.get("profiles") or ({"main": ["base", "lora"]} if {"base", "lora"} <= set(arms) else {})
    aliases = proto.get("arm_aliases") or {}
    lora_name = (manifest.get("lora") or {}).get("file_name") or "the examined LoRA"
    adapters = {"target": f"the examined LoRA ({_clip(lora_name, 60)[0]})"}
    for c in manifest.get("comparison_loras") or []:
        if isinstance(c, dict) and c.get("adapter"):
            adapters[str(c["adapter"])] = f"comparison LoRA {_clip(PurePosixPath(str(c.get('path', ''))).name or c['adapter'], 60)[0]}"
    def order(name: str):
        kind, _, rest = name.partition(":")
        rank = {"main": 0, "scale": 1, "trigger": 2, "comparison": 3}.get(kind, 4)
        try:
            sub = (float(rest), "") if kind == "scale" else (0.0, rest)
        except ValueError:
            sub = (0.0, rest)
        return (rank, sub, name)

    profiles = {k: profiles[k] for k in sorted(profiles, key=order)}
    used: dict[str, list[str]] = {}
    for prof, pair in profiles.items():
        for a in pair:
            used.setdefault(a, []).append(prof)
    first_use = {}
    for prof, pair in profiles.items():
        for a in pair:
            first_use.setdefault(a, len(first_use))
    rows = []
    for name in sorted(arms, key=lambda n: (first_use.get(n, len(first_use)), n)):
        a = arms[name]
        adapter = a.get("adapter")
        rows.append({"name": name, "adapter": "none (base weights)" if adapter is None else adapters.get(adapter, str(adapter)),
                     "scale": a.get("scale"), "triggers": bool(a.get("with_triggers")),
                     "profiles": used.get(name, [])})
    profile_rows = [{"name": p, "base": pair[0], "lora": pair[1], "purpose": _profile_purpose(p, adapters)}
                    for p, pair in profiles.items() if isinstance(pair, (list, tuple)) and len(pair) == 2]
    shared = [{"arm": a, "profiles": ps} for a, ps in used.items() if len(ps) > 1]
    renamed = [{"requested": k, "generated": v} for k, v in aliases.items() if k != v]
    return {"rows": rows, "profiles": profile_rows, "shared": shared, "aliases": renamed}


# ----------------------------------------------------------------------------- head-to-head


def _arm_image(case_dir: Path, row: dict, arm: str, rel_display: str, mismatches: list[dict]) -> dict | None:
    """One image of a pair for a triptych: checked against its recorded hash, a display copy when large."""
    rec = (row.get("arms") or {}).get(arm)
    if not isinstance(rec, dict) or not rec.get("image"):
        return None
    path = _case_file(case_dir, rec["image"])
    if not path.is_file():
        raise AuditError(f"case folder {case_dir} lacks {rec['image']} (pair {row['pair_id']}, arm {arm}); the report needs every image it shows")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if arm not in ("base", "lora") and actual != rec.get("image_sha256"):  # base and LoRA: image_evidence
        mismatches.append({"pair_id": row["pair_id"], "arm": arm, "path": rec["image"],
                           "recorded": rec.get("image_sha256"), "actual": actual})
    rel = rec["image"]
    copy = figures.display_copy(data)
    if copy is not None:
        rel = rel_display
        write_bytes_atomic(case_dir / rel, copy)
    return {"src": quote(rel), "hash": _short(rec.get("image_sha256"))}


def _head_to_head(case_dir: Path, manifest: dict, comparison: dict | None, figs: dict, prompt_text: dict,
                  mismatches: list[dict]) -> list[dict]:
    """comparison.json ``head_to_head``: one entry per comparison LoRA, with its triptychs."""
    h2h = (comparison or {}).get("head_to_head")
    if not isinstance(h2h, list):
        return []
    rows_by_id = {r["pair_id"]: r for r in manifest["pairs"]}
    out = []
    for i, h in enumerate(h2h, start=1):
        if not isinstance(h, dict):
            continue
        arm = str(h.get("arm", ""))
        lora = h.get("lora") or {}
        b = h.get("behaviour") or {}
        w = h.get("weights") or {}
        ppc = b.get("per_pair_cosine") or {}
        values = ppc.get("values") or {}
        q = ppc.get("quantiles") or {}

        def triptychs(ids, group):
            cards = []
            for k, pid in enumerate(ids or []):
                row = rows_by_id.get(pid)
                if row is None:
                    continue
                imgs = {role: _arm_image(case_dir, row, a, f"figures/display/h2h{i:02d}_{group}{k:02d}_{role}.png", mismatches)
                        for role, a in (("base", "base"), ("target", "lora"), ("cmp", arm))}
                if any(v is None for v in imgs.values()):
                    continue
                text, cut = _clip(prompt_text.get(row["prompt_id"], ""), 110)
                cards.append({"pair_id": row["pair_id"], "prompt_id": row["prompt_id"], "seed": row["seed"],
                              "prompt": text + ("…" if cut else ""), "cosine": _num_or_none(values.get(pid)), **imgs})
            return cards

        def names(key):
            v = w.get(key) or []
            return {"n": len(v), "first": [_clip(x, 100)[0] for x in v[:N_MODULE_NAMES]]}

        st, co = b.get("strength") or {}, b.get("consistency") or {}
        name, cut = _clip(lora.get("file_name") or f"comparison LoRA {i}", 120)
        out.append({
            "index": i, "arm": arm, "file_name": name + ("…" if cut else ""), "sha256": str(lora.get("sha256") or ""),
            "direction_cosine": _num_or_none(b.get("direction_cosine")), "direction_cosine_ci": _pair_ci(b.get("direction_cosine_ci")),
            "per_pair_mean": _num_or_none(ppc.get("mean")),
            "quantiles": [(k, _num_or_none(q.get(k))) for k in ("p05", "p25", "p50", "p75", "p95") if k in q],
            "n_pairs": len(values),
            "per_category": [{"name": _clip(c, 60)[0], "cosine": _num_or_none(v)}
                             for c, v in sorted((b.get("per_category_cosine") or {}).items(), key=lambda kv: str(kv[0]))],
            "strength": {"target": _num_or_none(st.get("target")), "comparison": _num_or_none(st.get("comparison"))},
            "consistency": {"target": _num_or_none(co.get("target")), "comparison": _num_or_none(co.get("comparison"))},
            "weights": {"present": bool(w), "cosine": _num_or_none(w.get("cosine")), "norm_ratio": _num_or_none(w.get("norm_ratio")),
                        "payload_identical": w.get("payload_identical"), "modules_compared": w.get("modules_compared"),
                        "only_a": names("modules_only_in_a"), "only_b": names("modules_only_in_b"),
                        "format_a": w.get("format_a"), "format_b": w.get("format_b"),
                        "reading": _clip(w.get("reading") or "", 200)[0]},
            "figure": figs.get(f"h2h_{i}"),
            "agree_most": triptychs(b.get("agree_most"), "m"),
            "agree_least": triptychs(b.get("agree_least"), "l"),
        })
    return out


def build_context(case_dir: Path, manifest: dict, metrics: dict, comparison: dict | None,
                  figs: dict, evidence: dict, attachments: list[dict]) -> dict:
    run = manifest.get("run", {})
    proto = manifest.get("protocol", {})
    lora = manifest.get("lora", {})
    prompts = manifest.get("prompts", [])
    prompt_text = {p["id"]: p["text"] for p in prompts}
    rows_by_id = {r["pair_id"]: r for r in manifest["pairs"]}

    # head-to-head first: its triptych images are hash-checked and join the mismatches below
    head_to_head = _head_to_head(case_dir, manifest, comparison, figs, prompt_text, evidence["mismatches"])
    n_cmp_images_checked = sum(len(t) for h in head_to_head for t in (h["agree_most"], h["agree_least"]))

    sample, largest, smallest = select_body_pairs(manifest, metrics)
    cards = lambda ids: [_pair_card(rows_by_id[i], prompt_text.get(rows_by_id[i]["prompt_id"], ""), evidence) for i in ids]  # noqa: E731

    per_prompt = metrics.get("per_prompt", {})
    prompt_meta = {p["id"]: p for p in prompts}
    ranked = sorted(per_prompt.items(), key=lambda kv: (-kv[1]["strength"], kv[0]))

    def prompt_rows(items):
        out = []
        for pid, v in items:
            text, cut = _clip(prompt_text.get(pid, ""), 140)
            out.append({"id": pid, "category": prompt_meta.get(pid, {}).get("category", ""), "text": text + ("…" if cut else ""),
                        "strength": v["strength"], "consistency": v.get("consistency")})
        return out

    k = min(N_TOP_PROMPTS, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
    top_prompts = prompt_rows(ranked[:k])
    bottom_prompts = prompt_rows(list(reversed(ranked[len(ranked) - k:]))) if len(ranked) > 1 else []

    # appendix: every pair, grouped by prompt, with its contact sheet(s)
    norms = evidence["norms"]
    appendix = []
    by_prompt: dict[str, list[dict]] = {}
    for r in manifest["pairs"]:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for pid, rows in by_prompt.items():
        meta = prompt_meta.get(pid, {})
        appendix.append({
            "id": pid, "category": meta.get("category", rows[0].get("category", "")),
            "subcategory": meta.get("subcategory", rows[0].get("subcategory", "")),
            "text": prompt_text.get(pid, ""),
            "sent_base": rows[0]["arms"]["base"]["prompt"], "sent_lora": rows[0]["arms"]["lora"]["prompt"],
            "sheets": evidence["sheets"].get(pid, []),
            "hash_table": hash_table(rows, norms),
        })

    inputs = [{"role": i.get("role", "?"), "kind": i.get("kind", "file"), "path": i.get("path", ""), "size": i.get("size"),
               "sha256": i.get("sha256"), "sha256_end": i.get("sha256_end"), "unchanged": bool(i.get("unchanged"))}
              for i in manifest.get("inputs", [])]
    custody_ok = bool(manifest.get("custody_ok")) and all(i.get("unchanged") for i in inputs)
    metrics_recorded = (manifest.get("results") or {}).get("metrics.json")
    metrics_actual = sha256_file(case_dir / "metrics.json")
    load = lora.get("load") or {}
    known = read_json(KNOWN_ERRORS)

    warnings = []
    if not custody_ok:
        changed = [f"{i.get('role')} ({Path(str(i.get('path', ''))).name})" for i in inputs if not i.get("unchanged")]
        warnings.append("CHAIN OF CUSTODY FAILED: input file(s) changed while the run was in progress: "
                        + (", ".join(changed) or "see Appendix B")
                        + ". The run is marked invalid; its results must not be relied on.")
    if evidence["mismatches"]:
        warnings.append(f"{len(evidence['mismatches'])} image file(s) in the case folder do not match the sha256 recorded "
                        "in the manifest (listed in Appendix B). The images shown may not be the images that were measured.")
    if metrics_recorded and metrics_recorded != metrics_actual:
        warnings.append("metrics.json in the case folder does not match the sha256 recorded in the manifest at the end of the run.")
    if load.get("partial"):
        warnings.append(f"Only {load.get('applied')} of {load.get('in_file')} modules in the LoRA file were applied to the base model "
                        "(run with --allow-partial). The profile describes the applied part only.")
    cmp_ctx = _comparison(comparison)
    if cmp_ctx["configured"] and not cmp_ctx["compatible"]:
        warnings.append("The reference corpus was made with a different protocol (differing: "
                        + (", ".join(cmp_ctx["differing_fields"]) or "unspecified")
                        + "). Percentiles and neighbours below compare unlike measurements and should not be relied on.")

    ci = metrics.get("ci", {})
    return {
        "version": __version__,
        "case": manifest.get("case", {}),
        "tool": manifest.get("tool", {}),
        "run": run,
        "document_date": _iso(run["source_date_epoch"]),
        "command": shlex.join(portable_command(run.get("command", []))),
        "lora": lora,
        "lora_size": next((i.get("size") for i in inputs if i.get("role") == "lora"), None),
        "self_reported": _self_reported(lora),
        "base_model": manifest.get("base_model", {}),
        "embedder": manifest.get("embedder", {}),
        "protocol": proto,
        "seeds_text": _seeds_text(list(proto.get("seeds", []))),
        "signature_rows": _flatten(manifest.get("signature", {})),
        "metrics": metrics,
        "ci": ci,
        "figures": figs,
        "comparison": cmp_ctx,
        "warnings": warnings,
        "custody_ok": custody_ok,
        "inputs": inputs,
        "metrics_sha256_recorded": metrics_recorded,
        "metrics_sha256_actual": metrics_actual,
        "attachments": attachments,
        "image_mismatches": evidence["mismatches"],
        "n_images": evidence["n_images"],
        "sample_cards": cards(sample),
        "largest_cards": cards(largest),
        "smallest_cards": cards(smallest),
        "top_prompts": top_prompts,
        "bottom_prompts": bottom_prompts,
        "per_category": [{"name": n, **metrics["per_category"][n]} for n in sorted(metrics.get("per_category", {}))],
        "prompts": prompts,
        "appendix_prompts": appendix,
        "environment_rows": _flatten({k: v for k, v in (manifest.get("environment") or {}).items() if k != "packages"}),
        "package_rows": _flatten((manifest.get("environment") or {}).get("packages", {})),
        "known_errors": known.get("entries", []),
        "arms": proto.get("arms", {}),
        "arms_plan": _arms_plan(manifest),
        "indicators": _indicators(metrics),
        "head_to_head": head_to_head,
        "n_cmp_images_checked": n_cmp_images_checked,
    }


# ----------------------------------------------------------------------------- rendering


def _jinja_env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

    def num(x, digits: int = 4):
        if x is None:
            return "n/a"
        return f"{float(x):.{digits}f}"

    def trim(x) -> str:
        return f"{float(x):.1f}".rstrip("0").rstrip(".")

    def pct(x):
        """A percentile as an ordinal: 40.0 -> '40th', 87.5 -> '87.5th', 1 -> '1st'."""
        if x is None:
            return "n/a"
        text = trim(x)
        if "." in text:
            return text + "th"
        n = int(text)
        return text + ("th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))

    def sig(x, digits: int = 3):
        """A small number with `digits` significant digits, never in exponent form."""
        if x is None:
            return "n/a"
        x = float(x)
        if x == 0:
            return "0"
        places = max(0, digits - 1 - math.floor(math.log10(abs(x))))
        return f"{x:.{min(places, 12)}f}"

    def percent(x):
        return "n/a" if x is None else f"{float(x):.0f}%"

    def g(x):
        return "n/a" if x is None else f"{float(x):g}"

    env.filters["num"] = num
    env.filters["g"] = g
    env.filters["sig"] = sig
    env.filters["percent"] = percent
    env.filters["pct"] = pct
    env.filters["trim"] = trim
    env.filters["short"] = _short
    return env


def render_html(context: dict) -> str:
    return _jinja_env().get_template(TEMPLATE).render(**context)


def render_report(case_dir: Path) -> Path:
    """Render ``report.pdf`` (and ``report.pdf.sha256``) from a finished case folder's stored
    results. Raises AuditError for a folder that is not a finished case."""
    case_dir = Path(case_dir).resolve()
    html, attach_data, epoch = prepare_html(case_dir)
    pdf = write_pdf(html, case_dir, attach_data, epoch)

    out = case_dir / "report.pdf"
    write_bytes_atomic(out, pdf)
    write_text_atomic(case_dir / "report.pdf.sha256", f"{sha256_bytes(pdf)}  report.pdf\n")
    return out


def prepare_html(case_dir: Path) -> tuple[str, dict[str, bytes], int]:
    """Everything before the PDF: check the images, draw the figures, render the HTML.
    Returns (html, the files to embed {name: bytes}, the document date as a Unix time)."""
    case_dir = Path(case_dir).resolve()
    if not (TEMPLATES_DIR / TEMPLATE).is_file():
        raise AuditError(f"report templates not found in {TEMPLATES_DIR}: carlos-audit renders reports from a source "
                         "checkout (pip install -e .), where templates/ sits beside the carlos_audit package")
    for name in ("manifest.json", "metrics.json"):
        if not (case_dir / name).is_file():
            raise AuditError(f"{case_dir} is not a finished case folder: it lacks {name} (run `carlos-audit run` first)")
    try:
        manifest = read_json(case_dir / "manifest.json")
        metrics = read_json(case_dir / "metrics.json")
        comparison = read_json(case_dir / "comparison.json") if (case_dir / "comparison.json").is_file() else None
    except (OSError, ValueError) as e:
        raise AuditError(f"{case_dir}: cannot read the stored results: {e}") from None
    for key in ("pairs", "run"):
        if key not in manifest:
            raise AuditError(f"{case_dir}/manifest.json lacks {key!r}; it was not written by a finished run")
    if "source_date_epoch" not in manifest["run"]:
        raise AuditError(f"{case_dir}/manifest.json lacks run.source_date_epoch")
    epoch = int(manifest["run"]["source_date_epoch"])

    sample, largest, smallest = select_body_pairs(manifest, metrics)
    evidence = image_evidence(case_dir, manifest, metrics, set(sample) | set(largest) | set(smallest))
    figs = figures.write_result_figures(case_dir, metrics, comparison)

    attach_names = ["manifest.json", "metrics.json"] + (["comparison.json"] if comparison is not None else [])
    attach_data = {n: (case_dir / n).read_bytes() for n in attach_names}
    attachments = [{"name": n, "size": len(d), "sha256": sha256_bytes(d)} for n, d in attach_data.items()]

    context = build_context(case_dir, manifest, metrics, comparison, figs, evidence, attachments)
    return render_html(context), attach_data, epoch


def write_pdf(html: str, case_dir: Path, attach_data: dict[str, bytes], epoch: int) -> bytes:
    """HTML -> PDF/A-3b bytes, fetching only from the case and templates folders."""
    import logging

    from weasyprint import CSS, HTML, Attachment

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    _, RefusedFetch = _url_fetcher_class()
    fetcher = make_url_fetcher(case_dir)
    when = datetime.fromtimestamp(epoch, tz=timezone.utc).replace(tzinfo=None)
    descriptions = {"manifest.json": "the run's manifest: protocol, inputs, every pair and its hashes",
                    "metrics.json": "the CARLoS metrics and their confidence intervals",
                    "comparison.json": "the comparison with the reference corpus and the head-to-head comparisons"}
    try:
        css = CSS(url=TEMPLATES_URL + STYLESHEET, url_fetcher=fetcher)
        doc = HTML(string=html, base_url=CASE_URL, url_fetcher=fetcher)
        attachments = [Attachment(string=data, name=name, description=descriptions.get(name, name),
                                  created=when, modified=when, relationship="Data", url_fetcher=fetcher)
                       for name, data in attach_data.items()]
        return doc.write_pdf(stylesheets=[css], attachments=attachments, pdf_variant="pdf/a-3b",
                             pdf_identifier=sha256_bytes(attach_data["manifest.json"])[:32].encode(),
                             uncompressed_pdf=False)
    except RefusedFetch as e:
        raise AuditError(f"report rendering stopped: {e}") from None
