"""``[near_copies]`` in the case file (case/near_copies.py): the extraction protocol's prompts,
seeds and pairs, and hostile inputs refused in one line (too many samples, no claimed works,
blank or repeated captions, every work blank)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from carlos_audit.case.casefile import load_case
from carlos_audit.case.near_copies import MAX_IMAGES, MAX_SAMPLES_PER_PROMPT, check_works, pairs, prompts, seeds
from carlos_audit.errors import AuditError

HEAD = """
[case]
id = "nc"
title = "t"
examiner = "e"
question = "q"

[base_model]
source = "embedded:tiny-sd"

[embedder]
model = "embedded:tiny-clip"

[lora]
path = "x.safetensors"
trigger_words = ["tgtstyle"]

[protocol]
prompts = "builtin:demo"
seeds = [0]
width = 64
height = 64
batch_size = 4
"""


def works_table(tmp_path, images) -> str:
    names, hashes = [], []
    for k, im in enumerate(images):
        p = tmp_path / f"w{k}.png"
        im.save(p)
        names.append(p.name)
        hashes.append(hashlib.sha256(p.read_bytes()).hexdigest())
    return (f'\n[claimed_works]\nlabel = "the works"\nsupplier = "s"\nfiles = {names!r}\nsha256 = {hashes!r}\n'
            .replace("'", '"'))


def case_file(tmp_path, near: str, works: str | None = None):
    rng = np.random.default_rng(0)
    if works is None:
        works = works_table(tmp_path, [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))])
    p = tmp_path / "case.toml"
    p.write_text(HEAD + works + "\n[near_copies]\n" + near)
    return load_case(p)


def test_prompts_seeds_and_pairs(tmp_path):
    case = case_file(tmp_path, 'samples_per_prompt = 3\nseed_start = 10\ncaptions = ["a fox", "a harbour"]\n')
    assert [p.text for p in prompts(case)] == ["a fox, tgtstyle", "a harbour, tgtstyle"]
    assert seeds(case) == [10, 11, 12]
    got = pairs(case)
    assert [p.id for p in got] == ["nc001_s10", "nc001_s11", "nc001_s12", "nc002_s10", "nc002_s11", "nc002_s12"]
    assert [p.batch for p in got] == [0, 0, 0, 0, 1, 1]
    label = case_file(tmp_path, "samples_per_prompt = 2\ntrigger_words = false\n")
    assert [p.text for p in prompts(label)] == ["the works"] and prompts(label)[0].subcategory == "label"


@pytest.mark.parametrize("near, says", [
    (f"samples_per_prompt = {MAX_SAMPLES_PER_PROMPT + 1}\n", "must be between 1 and"),
    ("samples_per_prompt = 0\n", "must be between 1 and"),
    ("samples_per_prompt = 200\ncaptions = [" + ", ".join(f'"c{k}"' for k in range(30)) + "]\n",
     f"at most {MAX_IMAGES:,} are accepted"),
    ('samples_per_prompt = 2\ncaptions = ["a fox", "a fox"]\n', "duplicates"),
    ('samples_per_prompt = 2\ncaptions = ["a fox", "  "]\n', "blank caption"),
    ("samples_per_prompt = 2\nalpha = 0.5\n", "near_copies.alpha"),
    ("seed_start = 3\n", "needs near_copies.samples_per_prompt"),
])
def test_hostile_tables_are_refused_in_one_line(tmp_path, near, says):
    with pytest.raises(AuditError) as e:
        case_file(tmp_path, near)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_near_copies_need_claimed_works(tmp_path):
    with pytest.raises(AuditError, match=r"\[near_copies\] needs \[claimed_works\]"):
        case_file(tmp_path, "samples_per_prompt = 2\n", works="")


def test_every_work_blank_is_refused_before_generation(tmp_path):
    blank = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (32, 48), (10, 10, 10))]
    case = case_file(tmp_path, "samples_per_prompt = 2\n", works=works_table(tmp_path, blank))
    with pytest.raises(AuditError, match="every claimed work is blank") as e:
        check_works(case)
    assert "\n" not in str(e.value)
    rng = np.random.default_rng(1)
    one_real = blank + [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))]
    check_works(case_file(tmp_path, "samples_per_prompt = 2\n", works=works_table(tmp_path, one_real)))
