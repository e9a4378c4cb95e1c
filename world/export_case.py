"""The world case's inputs (casefiles/world-style.toml), written from the built data: the claimed works (a
designer's held-out works, concepts its LoRA never trained on, PNG 32x32 on white, pinned by a SHA256SUMS list)
and the prompt file (the world's concept names, captioned as the LoRAs were trained: ``a NAME emoji``).

Prompts are training concepts of both the base's designer (Noto) and the LoRA's designer, one per subcategory
group (faces, animals, food, sky, objects), so that a reader sees the same concept drawn in two hands.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from PIL import Image

import common
from data import caption

CASE = common.HERE / "case"
CASE_DESIGNER = "openmoji-black"  # the case LoRA's designer (casefiles/world-style.toml)
#: One concept per subcategory group, in both designers' training sets (checked on writing).
PROMPT_CONCEPTS = ["grinning face", "worried face", "crying cat face", "two hearts", "fox face", "octopus",
                   "watermelon", "birthday cake"]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_works(split: dict, arrays: dict, designer: str) -> None:
    """The designer's held-out works as PNG files named by code point and concept, and their SHA256SUMS."""
    names = [c["name"] for c in split["concepts"]]
    folder = CASE / "works" / designer
    folder.mkdir(parents=True, exist_ok=True)
    sums = []
    for i in split["held_out_works"][designer]:
        fn = f"{split['concepts'][i]['unified'].lower()}-{slug(names[i])}.png"
        Image.fromarray(arrays[designer][i]).save(folder / fn, optimize=False)
        sums.append(f"{hashlib.sha256((folder / fn).read_bytes()).hexdigest()}  {fn}")
    (folder / "SHA256SUMS").write_text("\n".join(sorted(sums, key=lambda s: s.split()[1])) + "\n")
    print(f"{len(sums)} works of {designer} in {folder}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--designers", nargs="+", default=[CASE_DESIGNER, "twemoji"],
                    help="whose held-out works to write (the case's claimed works; another designer's for the tests)")
    a = ap.parse_args()
    split, arrays = common.load_data()
    names = [c["name"] for c in split["concepts"]]
    for designer in a.designers:
        write_works(split, arrays, designer)
    train = set(split["train"]["noto"]) & set(split["train"][CASE_DESIGNER])
    missing = [n for n in PROMPT_CONCEPTS if n not in names or names.index(n) not in train]
    if missing:
        raise SystemExit(f"prompt concepts not in both training sets: {missing}")
    (CASE / "prompts.txt").write_text("# The world's concept names (world/export_case.py), as the LoRAs were captioned\n"
                                      + "".join(caption(n, None) + "\n" for n in PROMPT_CONCEPTS))
    print(f"{len(PROMPT_CONCEPTS)} prompts in {CASE / 'prompts.txt'}", flush=True)


if __name__ == "__main__":
    main()
