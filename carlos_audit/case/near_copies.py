"""``[near_copies]``: the opt-in extraction protocol of the near-copy exhibit (analysis/near_copies.py).

    [near_copies]
    samples_per_prompt = 8        # images per prompt in each arm (seeds seed_start, seed_start + 1, ...)
    seed_start = 0
    captions = ["a fox in tall grass", ...]   # the works' captions as supplied; without them the
                                              # claimed works' label is the one prompt
    trigger_words = true          # the LoRA's trigger words appended to every prompt (both arms)
    alpha = 0.01                  # the thresholds' quantile of known non-copies

Two arms generate these prompts and seeds: ``nearcopy-lora`` (the case's LoRA at its scale) and
``nearcopy-base`` (no LoRA: the control), with the same prompt text in both. The table needs
``[claimed_works]``. Refused in one line: more than MAX_SAMPLES_PER_PROMPT samples per prompt, more
than MAX_IMAGES images per arm, blank or repeated captions, alpha outside (0, 0.2].
"""

from __future__ import annotations

import numpy as np

from carlos_audit.case.protocol import Pair, Prompt, enumerate_pairs
from carlos_audit.errors import AuditError

MAX_SAMPLES_PER_PROMPT = 256
MAX_IMAGES = 4096
BASE_ARM, LORA_ARM = "nearcopy-base", "nearcopy-lora"
CATEGORY = "near_copies"
#: the common size of the pixel measure (analysis/near_copies.py)
PIXEL_SIZE = 64
#: a work whose resized pixels have a standard deviation under this is blank (no content to copy)
BLANK_STD = 2.0 / 255.0


def configured(section) -> bool:
    return section.get("samples_per_prompt") is not None


def check_section(c: dict, where: str) -> None:
    """The [near_copies] table's own rules (called by casefile._check_values with the whole case)."""
    from carlos_audit.case.claimed_works import configured as has_works

    nc = c["near_copies"]
    if not configured(nc):
        if any(nc[k] not in (None, [], 0, True, 0.01) for k in nc):
            raise AuditError(f"{where}: [near_copies] needs near_copies.samples_per_prompt (images per prompt in each arm)")
        return
    if not has_works(c["claimed_works"]):
        raise AuditError(f"{where}: [near_copies] needs [claimed_works]: the works whose near-copies are searched")
    n = nc["samples_per_prompt"]
    if not 1 <= n <= MAX_SAMPLES_PER_PROMPT:
        raise AuditError(f"{where}: near_copies.samples_per_prompt must be between 1 and {MAX_SAMPLES_PER_PROMPT}, got {n}")
    if nc["seed_start"] < 0:
        raise AuditError(f"{where}: near_copies.seed_start must be >= 0")
    caps = nc["captions"]
    if any(not t.strip() for t in caps):
        raise AuditError(f"{where}: near_copies.captions has a blank caption")
    if len({t.strip() for t in caps}) != len(caps):
        raise AuditError(f"{where}: near_copies.captions has duplicates (each prompt would count twice)")
    total = max(1, len(caps)) * n
    if total > MAX_IMAGES:
        raise AuditError(f"{where}: [near_copies] asks for {total:,} images per arm ({max(1, len(caps))} prompts x {n}); "
                         f"at most {MAX_IMAGES:,} are accepted")
    if not 0 < nc["alpha"] <= 0.2:
        raise AuditError(f"{where}: near_copies.alpha must be in (0, 0.2], got {nc['alpha']}")


def prompts(case) -> list[Prompt]:
    """The extraction prompts: the captions as supplied, else the claimed works' label; the
    LoRA's trigger words appended (``, <word>`` each, the arms' convention) when asked."""
    nc = case.near_copies
    texts = [t.strip() for t in nc.captions] or [case.claimed_works.label.strip()]
    triggers = list(case.lora.trigger_words) if nc.trigger_words else []
    sub = "caption" if nc.captions else "label"
    return [Prompt(f"nc{k:03d}", CATEGORY, sub, t + "".join(f", {w}" for w in triggers))
            for k, t in enumerate(texts, start=1)]


def seeds(case) -> list[int]:
    nc = case.near_copies
    return list(range(nc.seed_start, nc.seed_start + nc.samples_per_prompt))


def pairs(case) -> list[Pair]:
    """The extraction protocol's pairs, in the case's batch layout."""
    return enumerate_pairs(prompts(case), seeds(case), case.protocol.batch_size)


def pixels(image, size: int = PIXEL_SIZE) -> np.ndarray:
    """A PIL image as (size, size, 3) float64 RGB in [0, 1], resized with Lanczos: the pixel
    reading of every picture the near-copy measures compare."""
    from PIL import Image

    im = image.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float64) / 255.0


def is_blank(px: np.ndarray) -> bool:
    return float(px.std()) < BLANK_STD


def check_works(case) -> None:
    """Refused in one line before anything is generated: every claimed work blank (nothing whose
    near-copies could be searched). Blank works among others, and works that are the same picture,
    are stated by the analysis (warnings in metrics.json and the report)."""
    from carlos_audit.case.claimed_works import DEFAULT_MAX_PIXELS, claimed_files, load_work

    works, _ = claimed_files(case.claimed_works, case.base_dir)
    max_pixels = case.claimed_works.max_pixels or DEFAULT_MAX_PIXELS
    if all(is_blank(pixels(load_work(w, max_pixels)[0])) for w in works):
        raise AuditError(f"[near_copies]: every claimed work is blank ({len(works)} of {len(works)}): there is nothing "
                         "whose near-copies could be searched")
