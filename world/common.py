"""Shared pieces of the world's training scripts: tokenizer, data tensors, seeding, training records."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data as world_data  # noqa: E402

BUILD = HERE / "build"
MODELS = HERE.parent / "carlos_audit" / "models" / "world"  # committed (small) weights, shipped with the package
CKPT = BUILD / "checkpoints"      # large / intermediate checkpoints, outside git
CONTEXT = 24                      # text context length (tokens, with start and end)

# OpenAI CLIP's normalisation, so the CLIP loads and preprocesses like a real one.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def threads() -> int:
    """One thread unless told otherwise: on a shared 2-core machine 2 OpenMP threads spin-wait badly."""
    import torch

    n = int(os.environ.get("WORLD_THREADS", "1"))
    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)
    return n


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data():
    return world_data.load(world_data.DEFAULT_OUT)


def captions_for(split: dict) -> list[str]:
    """Every caption the world uses: each concept plain and in each designer's style."""
    out = []
    for c in split["concepts"]:
        out.append(world_data.caption(c["name"], None))
        for d in split["designers"]:
            out.append(world_data.caption(c["name"], d))
    return out


# ---------------------------------------------------------------- tokenizer
def _open_clip_bpe():
    """open_clip's bundled BPE (the 49,408-token CLIP vocabulary), rebuilt offline."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return base, merges, vocab


def _bpe_symbols(word: str, ranks: dict) -> set[str]:
    """All symbols a BPE run over one (byte-encoded) word passes through."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    seen = set(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1e12), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        r, _ = min(pairs)
        if r == 1e12:
            break
        best = min(pairs)[1]
        a, b = symbols[best], symbols[best + 1]
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
        seen.update(symbols)
    return seen


def build_tokenizer(texts: list[str], folder: Path):
    """A transformers CLIPTokenizer whose vocabulary is CLIP's BPE cut to the tokens ``texts`` use.

    The kept merges are those whose parts and result are kept, in their original order, so every text in
    ``texts`` tokenizes exactly as with the full CLIP vocabulary; other text falls back to shorter pieces."""
    from open_clip.tokenizer import bytes_to_unicode, whitespace_clean, basic_clean
    from transformers import CLIPTokenizer

    base, merges, _ = _open_clip_bpe()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_enc = bytes_to_unicode()
    import regex  # open_clip's own dependency; \p{L} needs it

    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
    kept: set[str] = set()
    for t in texts:
        t = whitespace_clean(basic_clean(t)).lower()
        for w in pat.findall(t):
            kept |= _bpe_symbols("".join(byte_enc[b] for b in w.encode("utf-8")), ranks)
    vocab = base + [v + "</w>" for v in base]
    vs = set(vocab)
    new_merges = [m for m in merges if m[0] in (kept | vs) and m[1] in (kept | vs) and "".join(m) in kept]
    for m in new_merges:
        tok = "".join(m)
        if tok not in vs:
            vocab.append(tok)
            vs.add(tok)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2 (CLIP BPE cut to the world's captions)\n"
                                       + "\n".join(" ".join(m) for m in new_merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CONTEXT,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def check_tokenizer(tok, texts: list[str]) -> int:
    """Token ids agree with open_clip's tokenizer (mapped through the cut vocabulary); returns the texts checked."""
    import open_clip

    _, _, full = _open_clip_bpe()
    inv = tok.get_vocab()
    ref = open_clip.tokenize(texts, context_length=CONTEXT)
    for t, r in zip(texts, ref):
        ids = tok(t, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]
        want = [inv[full[i]] for i in r.tolist() if i != 0]
        got = [i for i in ids][: len(want)]
        if got != want:
            raise RuntimeError(f"tokenizer mismatch on {t!r}: {got} vs {want}")
    return len(texts)


# ---------------------------------------------------------------- records
def sha_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__, "machine": platform.machine(),
           "torch_threads": torch.get_num_threads()}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return out


class Record:
    """A JSON training record, rewritten at every checkpoint so that a stopped run keeps its log."""

    def __init__(self, path: Path, **fields):
        self.path = Path(path)
        self.t0 = time.time()
        self.data = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
                     **fields, "log": []}

    def log(self, **entry):
        entry["wall_s"] = round(time.time() - self.t0, 1)
        self.data["log"].append(entry)
        print(json.dumps(entry), flush=True)

    def save(self, **fields):
        self.data.update(fields)
        self.data["wall_s"] = round(time.time() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def data_hashes(split: dict) -> dict:
    return {"images_sha256": split["image_sha256"], "packages": {p["name"] + "@" + p["version"]: p["sha256"]
                                                                  for p in split["packages"]}}
