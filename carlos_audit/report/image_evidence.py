"""The image evidence: hash checks, contact sheets, display copies, the pairs shown in the body
(section "Image evidence") and the seed manifest of every pair (the appendix)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from carlos_audit.errors import AuditError
from carlos_audit.fileio import write_bytes_atomic
from carlos_audit.hashing import sha256_bytes
from carlos_audit.records import Manifest, Metrics, Pair, Prompt
from carlos_audit.report import figures
from carlos_audit.report.text import ellipsis, short

N_SAMPLE_PROMPTS = 8      # body grid 1: the first seed of the first N prompts (fixed in advance)
N_EXTREMES = 4            # body grid 2: the N largest and N smallest effects


def case_file(case_dir: Path, rel: str) -> Path:
    """A path recorded in the manifest, refused if it leaves the case folder."""
    p = (case_dir / rel).resolve()
    if not p.is_relative_to(case_dir):
        raise AuditError(f"manifest.json names {rel!r}, which is outside the case folder {case_dir}")
    return p


def select_body_pairs(manifest: Manifest, metrics: Metrics, max_pairs: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """The pairs shown full size: a sample fixed in advance (first seed of the first prompts),
    and the largest and smallest effects (by ||d_i||). ``max_pairs`` caps the three together
    (``[report] max_pairs_in_body``, filing copy): half the sample, the rest the extremes."""
    n_sample, n_large, n_small = N_SAMPLE_PROMPTS, N_EXTREMES, N_EXTREMES
    if max_pairs is not None:
        n_sample = min(N_SAMPLE_PROMPTS, (max_pairs + 1) // 2)
        n_large = min(N_EXTREMES, (max_pairs - n_sample + 1) // 2)
        n_small = min(N_EXTREMES, max_pairs - n_sample - n_large)
    first_of_prompt = {}
    for row in manifest.pairs:
        first_of_prompt.setdefault(row.prompt_id, row.pair_id)
    sample = list(first_of_prompt.values())[:n_sample]
    ranked = sorted(metrics.per_pair, key=lambda p: (-p.diff_norm, p.pair_id))
    largest = [p.pair_id for p in ranked[:n_large]]
    smallest = [p.pair_id for p in reversed(ranked[len(ranked) - n_small:]) if p.pair_id not in largest] if n_small else []
    return sample, largest, smallest


def image_evidence(case_dir: Path, manifest: Manifest, metrics: Metrics, body_ids: set[str], display_px: dict[str, int]) -> dict:
    """Check every image against its recorded hash; write one contact sheet per prompt (chunks
    of SHEET_MAX_COLUMNS seeds) and display copies for the body pairs, one set per edge length
    in ``display_px`` ({copy: px}, e.g. {"archive": 256, "filing": 128}).

    Images are read one prompt at a time, so memory stays bounded whatever the case size.
    """
    norms = {p.pair_id: p.diff_norm for p in metrics.per_pair}
    groups: dict[str, list[Pair]] = {}
    for row in manifest.pairs:
        groups.setdefault(row.prompt_id, []).append(row)

    mismatches, sheets_by_prompt = [], {}
    display: dict[str, dict] = {copy: {} for copy in display_px}
    sheet_no = n_display = 0
    for prompt_id, rows in groups.items():
        sheets = []
        for start in range(0, len(rows), figures.SHEET_MAX_COLUMNS):
            chunk = rows[start:start + figures.SHEET_MAX_COLUMNS]
            columns, names = [], []
            for row in chunk:
                data = {}
                for arm in ("base", "lora"):
                    rec = row.arms[arm]
                    path = case_file(case_dir, rec.image)
                    if not path.is_file():
                        raise AuditError(f"case folder {case_dir} lacks {rec.image} (pair {row.pair_id}); the report needs every image the manifest records")
                    data[arm] = path.read_bytes()
                    actual = sha256_bytes(data[arm])
                    if actual != rec.image_sha256:
                        mismatches.append({"pair_id": row.pair_id, "arm": arm, "path": rec.image,
                                           "recorded": rec.image_sha256, "actual": actual})
                    if row.pair_id in body_ids:
                        for copy, px in sorted(display_px.items()):
                            display[copy][(row.pair_id, arm)] = display_src(case_dir, data[arm], rec.image, px,
                                                                               f"figures/display/{px}/{n_display:05d}_{arm}.png")
                columns.append((data["base"], data["lora"]))
                names.append((row.arms["base"].image, row.arms["lora"].image))
                n_display += row.pair_id in body_ids
            sheet_no += 1
            rel = f"figures/sheets/sheet_{sheet_no:05d}.jpg"
            write_bytes_atomic(case_dir / rel, figures.contact_sheet(columns, names))
            width_mm = min(178.0, len(chunk) * 22.0)
            sheets.append({"src": rel, "width_mm": f"{width_mm:.1f}", "seeds": [r.seed for r in chunk]})
        sheets_by_prompt[prompt_id] = sheets

    return {"mismatches": mismatches, "display": display, "sheets": sheets_by_prompt,
            "n_images": 2 * len(manifest.pairs), "norms": norms}


def display_src(case_dir: Path, data: bytes, rel: str, px: int, copy_rel: str) -> str:
    """The URL of an image as the body shows it: the original, or a downscaled copy (written to
    ``copy_rel``) when it is larger than ``px``."""
    copy = figures.display_copy(data, px, rel)
    if copy is not None:
        rel = copy_rel
        write_bytes_atomic(case_dir / rel, copy)
    return quote(rel)


def hash_table(rows: list[Pair], norms: dict) -> str:
    """The seed manifest of one prompt as fixed-width text (two lines per pair: base, LoRA).

    Plain preformatted text rather than an HTML table: weasyprint lays out 4,480 table rows
    three times slower, and the text copies out of the PDF exactly as printed."""
    w = max([len("pair")] + [len(str(r.pair_id)) for r in rows])
    lines = [f"{'pair':<{w}}  {'seed':>5}  arm   image sha256{' ' * 52}  ||d||"]
    for r in rows:
        norm = norms.get(r.pair_id)
        lines.append(f"{r.pair_id:<{w}}  {r.seed:>5}  base  {r.arms['base'].image_sha256:<64}  "
                     + ("n/a" if norm is None else f"{norm:.4f}"))
        lines.append(f"{'':<{w}}  {'':>5}  LoRA  {r.arms['lora'].image_sha256}")
    return "\n".join(lines)


def pair_cards(ids: list[str], manifest: Manifest, evidence: dict, copy: str) -> list[dict]:
    """The body's pairs (base image, LoRA image, caption) as the given copy shows them."""
    rows_by_id = {r.pair_id: r for r in manifest.pairs}
    prompt_text = {p.id: p.text for p in manifest.prompts}
    cards = []
    for pid in ids:
        row = rows_by_id[pid]
        cards.append({
            "pair_id": row.pair_id, "prompt_id": row.prompt_id, "seed": row.seed,
            "category": row.category if "category" in row else "", "prompt": ellipsis(prompt_text.get(row.prompt_id, ""), 110),
            "diff_norm": evidence["norms"].get(row.pair_id),
            "base_src": evidence["display"][copy][(row.pair_id, "base")],
            "lora_src": evidence["display"][copy][(row.pair_id, "lora")],
            "base_hash": short(row.arms["base"].image_sha256),
            "lora_hash": short(row.arms["lora"].image_sha256),
        })
    return cards


def appendix_prompts(manifest: Manifest, evidence: dict) -> list[dict]:
    """Every pair, grouped by prompt, with its contact sheet(s) and hash table."""
    prompt_meta = {p.id: p for p in manifest.prompts}
    by_prompt: dict[str, list[Pair]] = {}
    for r in manifest.pairs:
        by_prompt.setdefault(r.prompt_id, []).append(r)
    out = []
    for pid, rows in by_prompt.items():
        first = rows[0]
        meta = prompt_meta.get(pid, Prompt(category=first.category or "", subcategory=first.subcategory or "", text=""))
        out.append({
            "id": pid, "category": meta.category, "subcategory": meta.subcategory, "text": meta.text,
            "sent_base": first.arms["base"].prompt, "sent_lora": first.arms["lora"].prompt,
            "sheets": evidence["sheets"].get(pid, []),
            "hash_table": hash_table(rows, evidence["norms"]),
        })
    return out
