"""Each input read and hashed once per run (issue 29): a small case with a prompt file, a
comparison LoRA and the demo reference corpus, run on the tiny models under a Python audit hook
that counts every ``open`` of a path.

What the hook sees are Python-level opens (``open``, ``os.open``, numpy's): the LoRA files are read
once by intake (``LoraFile``: hashed, validated, inspected, compared from those bytes) and once
more by custody at the end of the run (the deliberate second hash: did an input change during the
run?); the prompt file the same (parsed and hashed from one read, then custody); each corpus file
once (the run opens the corpus once and hands it to the looks and the analysis). Reads made inside
compiled libraries (safetensors' tensor loader under diffusers, pyarrow) are not Python opens.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

from conftest import write_case

COUNTS: collections.Counter = collections.Counter()
READS: collections.Counter = collections.Counter()  # opens for reading only
WATCHING: list = []


def _hook(event, args):
    if event == "open" and WATCHING and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        COUNTS[path] += 1
        mode, flags = args[1], args[2]
        if (mode is not None and "r" in mode and "+" not in mode) or (mode is None and isinstance(flags, int)
                                                                       and flags & os.O_ACCMODE == os.O_RDONLY):
            READS[path] += 1


def test_each_input_file_is_read_once_per_run(demo_assets, tmp_path):
    from carlos_audit.case.casefile import load_case
    from carlos_audit.pipeline import run_case

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"people": {"portraits": ["a portrait of an old man"]},
                                   "objects": {"vehicles": ["a red car on a street"]}}))
    corpus = Path(demo_assets["corpus"])
    extra = (f'\n[comparison]\nloras = ["{demo_assets["loras"]["derivative"]}"]\n'
             f'\n[reference]\ncorpus = "{corpus}"\nallow_incompatible = true\n')
    case = load_case(write_case(tmp_path, demo_assets, prompts=str(prompts), steps=2, extra=extra))
    sys.addaudithook(_hook)
    COUNTS.clear()
    READS.clear()
    WATCHING.append(True)
    try:
        result = run_case(case, tmp_path / "out", progress=False)
    finally:
        WATCHING.clear()
    assert result.comparison.head_to_head and result.comparison.corpus["n"] > 0

    loras = [demo_assets["loras"]["target"], demo_assets["loras"]["derivative"]]
    reads = {Path(p).name: COUNTS[os.path.realpath(p)] for p in loras + [prompts]}
    assert reads == {"target.safetensors": 2, "derivative.safetensors": 2, "prompts.json": 2}, reads  # read + custody
    corpus_reads = {Path(p).name: n for p, n in COUNTS.items() if p.startswith(os.path.realpath(corpus) + os.sep)}
    assert corpus_reads and all(n == 1 for n in corpus_reads.values()), corpus_reads
    out = os.path.realpath(tmp_path / "out") + os.sep
    folder_reads = {p[len(out):]: n for p, n in READS.items() if p.startswith(out)}
    assert folder_reads and all(n <= 1 for n in folder_reads.values()), \
        {k: n for k, n in folder_reads.items() if n > 1}  # each case-folder file read (or hashed) once per run
