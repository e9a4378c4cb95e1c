"""The command line: a thin click layer over the library.

Only parsing, calling the library, printing and mapping errors to exit codes
live here. Heavy libraries (torch, diffusers, open_clip) are imported inside
the commands that need them, so ``carlos-audit --help`` answers at once.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import AuditError


class _AuditGroup(click.Group):
    """Turns AuditError (and a few OS errors) into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AuditError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; run the same command again to resume.", err=True)
            ctx.exit(130)


@click.group(cls=_AuditGroup)
@click.version_option(__version__, prog_name="carlos-audit")
def main():
    """Audit a Stable Diffusion LoRA with the CARLoS representation.

    \b
    Example:
        carlos-audit demo
        carlos-audit run casefiles/demo.toml
    """


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


# --- case runs (casefile.py, profile.py) ---

_run_options = [
    click.option("--out", type=click.Path(file_okay=False), default=None,
                 help="Output folder (default: reports/<case id>, or [output] dir)."),
    click.option("--force", is_flag=True, help="Replace a different case already in the output folder."),
    click.option("--allow-partial", is_flag=True, help="Profile a LoRA even if some of its modules were not applied (flagged)."),
    click.option("--allow-unsafe-pickle", is_flag=True, help="Accept pickle-based files (.ckpt/.pt/.bin): they can execute code."),
    click.option("--allow-download", is_flag=True, help="Allow downloading model weights from a hub (default: local cache only)."),
    click.option("--no-progress", is_flag=True, help="Hide progress bars."),
    click.option("--allow-incompatible", is_flag=True,
                 help="Compare with a reference corpus profiled differently (the report says so prominently)."),
]


def run_options(f):
    for opt in reversed(_run_options):
        f = opt(f)
    return f


def _quiet_libraries():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "open_clip", "peft", "huggingface_hub", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def _run(casefile, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress, allow_incompatible, argv):
    from .casefile import load_case, output_dir
    from .pipeline import run_full

    case = load_case(casefile)
    target = output_dir(case, out)
    _quiet_libraries()
    result = run_full(case, target, force=force, allow_partial=allow_partial,
                      allow_unsafe_pickle=allow_unsafe_pickle, allow_download=allow_download,
                      allow_incompatible=allow_incompatible, argv=argv, progress=not no_progress)
    m = result["metrics"]
    ci = m["ci"]
    cons = "null (" + m["consistency_note"] + ")" if m["consistency"] is None else f"{m['consistency']:.4f}"
    click.echo(f"case {case.id}: {m['n_pairs']} pairs -> {result['out']}")
    click.echo(f"  strength    {m['strength']:.4f}  95% CI [{ci['strength'][0]:.4f}, {ci['strength'][1]:.4f}]")
    if ci["consistency"]:
        cons += f"  95% CI [{ci['consistency'][0]:.4f}, {ci['consistency'][1]:.4f}]"
    click.echo(f"  consistency {cons}")
    for h in _head_to_head(result["out"]):
        b, w = h["behaviour"], h["weights"]
        ci = b["direction_cosine_ci"] or [None, None]
        click.echo(f"  vs {_label(h['lora']['file_name'])}: behaviour direction cosine {_fmt(b['direction_cosine'])} "
                   f"[{_fmt(ci[0])}, {_fmt(ci[1])}]; weights cosine {_fmt(w.get('cosine'))}, "
                   f"norm ratio {_fmt(w.get('norm_ratio'))} ({w['reading']})")
    for extra in result.get("written", []):
        click.echo(f"  wrote {extra}")


def _head_to_head(case_dir) -> list:
    from pathlib import Path

    from .fileio import read_json

    p = Path(case_dir) / "comparison.json"
    return read_json(p).get("head_to_head", []) if p.is_file() else []


@main.command()
@click.argument("casefile", type=click.Path(dir_okay=False))
@run_options
def run(casefile, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress, allow_incompatible):
    """Profile the case's LoRA: paired generation, CLIP features, CARLoS metrics, report.

    \b
    Example:
        carlos-audit run casefiles/demo.toml
        carlos-audit run my_case.toml --out /evidence/case-17
    """
    flags = [f for f, on in (("--allow-partial", allow_partial), ("--allow-incompatible", allow_incompatible),
                              ("--allow-unsafe-pickle", allow_unsafe_pickle)) if on]
    argv = ["carlos-audit", "run", casefile] + (["--out", out] if out else []) + flags
    _run(casefile, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress, allow_incompatible, argv)


@main.command()
@click.argument("casefile", type=click.Path(dir_okay=False))
@click.option("--with", "with_loras", multiple=True, type=click.Path(dir_okay=False),
              help="A comparison LoRA (repeatable), added to the case's [comparison] loras.")
@run_options
def compare(casefile, with_loras, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress,
            allow_incompatible):
    """Head-to-head: the case's LoRA against comparison LoRAs, in behaviour and in weights.

    Runs the case (sharing its base arm with every comparison LoRA) and prints both analyses.

    \b
    Example:
        carlos-audit compare casefiles/demo.toml
        carlos-audit compare my_case.toml --with suspect_copy.safetensors
    """
    casefile = _with_comparisons(casefile, with_loras) if with_loras else casefile
    argv = ["carlos-audit", "compare", casefile] + [a for p in with_loras for a in ("--with", p)]
    _run(casefile, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress, allow_incompatible, argv)


def _with_comparisons(casefile: str, loras) -> str:
    """A copy of the case file beside it with the extra comparison LoRAs (the original is never modified)."""
    import tomllib
    from pathlib import Path

    from .corpus_build import _dump_toml
    from .errors import AuditError

    src = Path(casefile)
    if not src.is_file():
        raise AuditError(f"case file not found: {src}")
    try:
        data = tomllib.loads(src.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AuditError(f"{src}: malformed TOML: {e}") from None
    data.setdefault("comparison", {}).setdefault("loras", [])
    data["comparison"]["loras"] += [str(Path(p).resolve()) for p in loras]
    dst = src.with_name(src.stem + ".compare.toml")
    dst.write_text(_dump_toml(data))
    return str(dst)


@main.command()
@click.option("--casefile", type=click.Path(dir_okay=False), default=None,
              help="Case file to run (default: casefiles/demo.toml of this checkout).")
@run_options
def demo(casefile, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress, allow_incompatible):
    """Build the embedded tiny models and demo LoRAs, then run the demo case.

    \b
    Example:
        carlos-audit demo
    """
    from pathlib import Path

    from .demo import prepare_demo

    _quiet_libraries()
    default = Path(__file__).resolve().parent.parent / "casefiles" / "demo.toml"
    casefile = casefile or str(default)
    info = prepare_demo(progress=not no_progress)
    click.echo(f"demo models, LoRAs and reference corpus ready in {info['home']}")
    _run(casefile, out, force, allow_partial, allow_unsafe_pickle, allow_download, no_progress, allow_incompatible,
         ["carlos-audit", "run", casefile])


# --- reference corpus (corpus.py) ---


def _label(text, width: int = 40) -> str:
    """Untrusted text made safe for one terminal cell: no control/format characters, cut to width."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text or ""))
    return s if len(s) <= width else s[: width - 1] + "…"


def _fmt(v, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


@main.group()
def corpus():
    """Reference corpora of CARLoS profiles: import, neighbours, stats.

    \b
    Example:
        carlos-audit corpus import ../shared/reference/carlos_sdxl_vitb32_metrics.parquet corpora/carlos
        carlos-audit corpus neighbours corpora/carlos --lora-id 128461
    """


@corpus.command("import")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["carlos-sdxl-vitb32", "none"]), default="carlos-sdxl-vitb32",
              show_default=True, help="Signature of the protocol the rows were profiled with ('none': unknown).")
@click.option("--name", default=None, help="Corpus name (default: the source file's stem).")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in DEST.")
def corpus_import(src, dest, preset, name, overwrite):
    """Import the public CARLoS metrics database (Parquet or CSV) into a corpus folder.

    \b
    Example:
        carlos-audit corpus import ../shared/reference/carlos_sdxl_vitb32_metrics.parquet corpora/carlos
    """
    from .corpus import import_carlos_db

    c = import_carlos_db(src, dest, None if preset == "none" else preset, overwrite=overwrite, name=name)
    click.echo(f"imported {c.n} rows (dim {c.dim}, {c.dtype}) into {c.path}")


@corpus.command("neighbours")
@click.argument("corpus_path", metavar="CORPUS", type=click.Path(file_okay=False))
@click.option("--lora-id", "lora_ids", multiple=True, required=True, help="Row id to look up (repeatable).")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object instead of a table.")
def corpus_neighbours(corpus_path, lora_ids, top_k, as_json):
    """Nearest rows by cosine of directions, and strength/consistency percentiles.

    \b
    Example:
        carlos-audit corpus neighbours corpora/carlos --lora-id 128461 --lora-id 135867 --top-k 5 --json
    """
    from .corpus import Corpus, neighbours

    c = Corpus.open(corpus_path)
    result = neighbours(c, list(lora_ids), top_k=top_k)
    if as_json:
        _print_json(result)
        return
    for rid, r in result.items():
        row = c.row(c.index_of(rid), ["name", "folder_name", "strength", "consistency"])
        click.echo(f"{_label(rid, 24)}  {_label(row['name'] or row['folder_name'])}")
        click.echo(f"  strength {_fmt(row['strength'])} (percentile {_fmt(r['strength_percentile'], '.1f')})  "
                   f"consistency {_fmt(row['consistency'])} (percentile {_fmt(r['consistency_percentile'], '.1f')})")
        click.echo(f"  {'rank':>4}  {'similarity':>10}  {'id':<12}  {'strength':>8}  {'consist.':>8}  name")
        for i, nb in enumerate(r["neighbours"], 1):
            click.echo(f"  {i:>4}  {nb['similarity']:>10.4f}  {_label(nb['id'], 12):<12}  {nb['strength']:>8.3f}  "
                       f"{_fmt(nb['consistency']):>8}  {_label(nb['name'])}")
        click.echo("")


@corpus.command("stats")
@click.argument("corpus_path", metavar="CORPUS", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object instead of a summary.")
def corpus_stats(corpus_path, as_json):
    """Size, signature, sources and distributions of a corpus.

    \b
    Example:
        carlos-audit corpus stats corpora/carlos
    """
    from .corpus import stats

    s = stats(corpus_path)
    if as_json:
        _print_json(s)
        return
    click.echo(f"corpus {_label(s['name'], 60)} at {s['path']}")
    click.echo(f"  rows {s['n']}, dim {s['dim']}, {s['dtype']}; preset {s['preset'] or '—'}")
    click.echo("  sources: " + (", ".join(f"{_label(k, 30)} {v}" for k, v in s["sources"].items()) or "—"))
    for key in ("strength", "consistency", "direction_norm"):
        q = s[key]
        if q is None:
            click.echo(f"  {key}: —")
            continue
        click.echo(f"  {key}: min {q['min']:.4g}, p05 {q['quantiles']['p05']:.4g}, median {q['median']:.4g}, "
                   f"p95 {q['quantiles']['p95']:.4g}, max {q['max']:.4g} (n={q['count']})")
    click.echo("  signature:")
    for k, v in s["signature"].items():
        click.echo(f"    {k}: {_label(json.dumps(v), 70)}")
    click.echo(f"  directions sha256 {s['directions_sha256']}")
    click.echo(f"  rows sha256       {s['rows_sha256']}")


@corpus.command("add")
@click.argument("corpus_path", metavar="CORPUS", type=click.Path(file_okay=False))
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--id", "row_id", default=None, help="Row id (default: the case id).")
@click.option("--name", default=None, help="Row name (default: the LoRA file name).")
@click.option("--allow-incompatible", is_flag=True, help="Add even though the signatures differ (recorded in the row).")
def corpus_add(corpus_path, case_dir, row_id, name, allow_incompatible):
    """Append a finished case (metrics.json + manifest.json) to a corpus.

    \b
    Example:
        carlos-audit corpus add corpora/mine reports/case-001
    """
    from .corpus import add_case

    row = add_case(corpus_path, case_dir, row_id=row_id, name=name, allow_incompatible=allow_incompatible)
    click.echo(f"added {_label(row['id'], 60)} as row {row['row']} of {corpus_path}")
    if row["differing"]:
        click.echo("Warning: signatures differ in " + ", ".join(row["differing"]), err=True)
    if row["unverifiable"]:
        click.echo("Note: not verifiable (missing on one side): " + ", ".join(row["unverifiable"]), err=True)


# --- corpus builds and text retrieval (corpus_build.py, retrieval.py) ---


@corpus.command("build")
@click.argument("lora_dir", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--casefile", "template", required=True, type=click.Path(dir_okay=False),
              help="Template case file: its protocol, base model and embedder are used for every LoRA.")
@click.option("--name", default=None, help="Corpus name (default: DEST's folder name).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the work units run: this process, or Ray tasks (pip install .[ray]). Same bytes either way.")
@click.option("--ray-address", default=None, help="Ray cluster to join (default: start a local one).")
@click.option("--gpus-per-task", type=click.FloatRange(min=0), default=0, show_default=True,
              help="GPUs each Ray task reserves (0.5: two workers share a GPU).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of every generating process (default: this process's); CPU results depend on it.")
def corpus_build(lora_dir, dest, template, name, no_progress, engine, ray_address, gpus_per_task, threads):
    """Profile every .safetensors LoRA in LORA_DIR under one protocol into corpus DEST.

    The base arm is generated once and shared; a build that stops resumes where it was.
    DEST/build.json records the hook-counted work against the minimum (L + 1) x P x S images.

    \b
    Example:
        carlos-audit corpus build loras/ --casefile casefiles/demo.toml corpora/mine
        carlos-audit corpus build loras/ --casefile t.toml corpora/mine --engine ray --gpus-per-task 1
    """
    from .corpus_build import build_corpus

    _quiet_libraries()
    result = build_corpus(lora_dir, template, dest, name=name, progress=not no_progress, engine=engine,
                          ray_address=ray_address, gpus_per_task=gpus_per_task, threads=threads)
    click.echo(f"corpus {result['corpus']}: {result['n']} rows "
               f"({len(result['added'])} added, {len(result['already_present'])} already present)")
    if result.get("build"):
        img = result["build"]["images"]
        click.echo(f"images generated {img['generated']} (minimum (L + 1) x P x S = {img['minimum']}); see {dest}/build.json")


@main.command()
@click.argument("corpus_path", metavar="CORPUS", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--max-strength", type=float, default=None, help="Drop LoRAs stronger than this (default: see docs).")
@click.option("--min-consistency", type=float, default=None, help="Drop LoRAs less consistent than this.")
@click.option("--prompts", default=None, help="Retrieval prompt set (builtin:NAME or a file; a CARLoS JSON gives its retrieval set).")
@click.option("--embedder-checkpoint", default=None, help="Checkpoint file of the corpus's embedder, when it was a file.")
@click.option("--allow-download", is_flag=True, help="Allow downloading the embedder's text tower.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def retrieve(corpus_path, query, top_k, max_strength, min_consistency, prompts, embedder_checkpoint, allow_download, as_json):
    """CARLoS text retrieval: corpus LoRAs whose Direction matches a text QUERY.

    \b
    Example:
        carlos-audit retrieve corpora/mine "watercolor painting" --top-k 5
    """
    from .retrieval import retrieve as do_retrieve

    _quiet_libraries()
    result = do_retrieve(corpus_path, query, top_k=top_k, max_strength=max_strength, min_consistency=min_consistency,
                         prompts=prompts, embedder_checkpoint=embedder_checkpoint, allow_download=allow_download)
    if as_json:
        _print_json(result)
        return
    f = result["filters"]
    click.echo(f"query {query!r}: {result['kept']} LoRAs kept by strength <= {_fmt(f['max_strength'])} and "
               f"consistency >= {_fmt(f['min_consistency'])} ({f['source']})")
    for r in result["results"]:
        click.echo(f"  {r['score']:+.4f}  {_label(r['id'], 24)}  {_label(r['name'] or '', 40)}  "
                   f"S={_fmt(r['strength'])} C={_fmt(r['consistency'])}")


# --- intake and weight comparison (lora_file.py, weights_compare.py) ---


def _untrusted(text, width: int = 100) -> str:
    """Self-reported text made safe for one terminal line: control characters replaced, cut to width."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return s if len(s) <= width else s[: width - 1] + f"… ({len(s)} chars; see --json)"


def _number(v, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def _hex_option(ctx, param, value):
    if value is None:
        return None
    v = value.strip().lower()
    if not (10 <= len(v) <= 64) or any(c not in "0123456789abcdef" for c in v):
        raise click.BadParameter("expected a sha256 in hex (10 to 64 hex digits)")
    return v


@main.command("inspect")
@click.argument("lora", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the full JSON report (per-module details included).")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Accept pickle-based files (.ckpt/.pt/.bin): hashed, never unpickled.")
@click.option("--base-sha256", default=None, callback=_hex_option, metavar="HEX",
              help="sha256 of the base checkpoint, checked against the hash the LoRA claims.")
def inspect_command(lora, as_json, allow_unsafe_pickle, base_sha256):
    """Validate a LoRA file and show its hashes, format, architecture, modules and metadata.

    \b
    Example:
        carlos-audit inspect my_lora.safetensors
        carlos-audit inspect my_lora.safetensors --json --base-sha256 31e35c80fc...
    """
    from .lora_file import inspect_lora

    r = inspect_lora(lora, allow_unsafe_pickle=allow_unsafe_pickle, base_model_sha256=base_sha256)
    if as_json:
        _print_json(r)
        return
    ranks, alphas = r["rank_summary"], r["alpha_summary"]
    evidence = r["architecture_evidence"]
    click.echo(f"file            {_untrusted(r['path'], 200)}")
    click.echo(f"size            {r['size']} bytes")
    click.echo(f"sha256          {r['sha256']}")
    click.echo(f"autov2          {r['autov2']}")
    click.echo(f"payload sha256  {r['payload_sha256'] or '—'}  (AutoV3; unchanged by metadata edits)")
    click.echo(f"format          {r['format']}")
    click.echo(f"architecture    {r['architecture']}  ({evidence.get('rule')})")
    click.echo(f"modules         {r['module_count']} ({r['parameter_count']} parameters)")
    click.echo(f"ranks           {', '.join(map(str, ranks['distinct'])) or '—'}")
    alpha_text = ", ".join(f"{a:g}" for a in alphas["distinct"]) or "—"
    if alphas["absent"]:
        alpha_text += f"  ({alphas['absent']} modules store none: alpha = rank)"
    click.echo(f"alphas          {alpha_text}")
    click.echo(f"|dW| total      {_number(r['weight_norm_total'])}")
    if r.get("unrecognised_tensors"):
        click.echo(f"unrecognised    {len(r['unrecognised_tensors'])} tensors not part of any LoRA module")
    claim = r["claimed_base_model_hash"]
    claim_text = "none" if claim is None else f"{_untrusted(claim['value'], 70)} ({claim['source']})"
    click.echo(f"base model hash claimed {claim_text}; check: {r['base_model_hash_check']}")
    click.echo("")
    click.echo("SELF-REPORTED metadata (unverified)")
    if not r["metadata"]:
        click.echo("  (none)")
    for key in sorted(r["metadata"]):
        click.echo(f"  {_untrusted(key, 40)}: {_untrusted(r['metadata'][key])}")
    if r["trigger_word_hints"]:
        click.echo("")
        click.echo("Trigger word hints (from self-reported metadata)")
        for hint in r["trigger_word_hints"]:
            count = f", {hint['count']}x" if "count" in hint else ""
            click.echo(f"  {_untrusted(hint['text'], 60)}  ({hint['source']}{count})")


@main.command("compare-weights")
@click.argument("lora_a", metavar="A", type=click.Path(dir_okay=True))
@click.argument("lora_b", metavar="B", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object (per-module cosines included).")
def compare_weights_command(lora_a, lora_b, as_json):
    """Compare two LoRA files by their weight changes, without generating images.

    \b
    Example:
        carlos-audit compare-weights original.safetensors suspect.safetensors
    """
    from .weights_compare import compare_weights, weights_reading

    r = compare_weights(lora_a, lora_b)
    reading = weights_reading(r)
    if as_json:
        _print_json({**r, "reading": reading})
        return
    for side in ("a", "b"):
        click.echo(f"{side.upper()}  {_untrusted(r['path_' + side], 200)}")
        click.echo(f"   format {r['format_' + side]}  sha256 {r['sha256_' + side]}")
        click.echo(f"   payload sha256 {r['payload_sha256_' + side]}")
    click.echo(f"payload identical  {'yes' if r['payload_identical'] else 'no'}")
    click.echo(f"modules compared   {r['modules_compared']} (only in A: {len(r['modules_only_in_a'])}, "
               f"only in B: {len(r['modules_only_in_b'])}, skipped: {len(r['modules_skipped'])})")
    click.echo(f"cosine             {_number(r['cosine'], '.6f')}  (over shared modules, norm-weighted)")
    click.echo(f"norm ratio |B|/|A| {_number(r['norm_ratio'], '.6f')}")
    click.echo(f"reading            {reading}")
    click.echo("                   (an indicator from the weights alone, not a conclusion)")


# --- report (report/) ---


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
def report(case_dir):
    """Re-render report.pdf of a finished case from its stored results (generates nothing).

    \b
    Example:
        carlos-audit report reports/demo
    """
    from pathlib import Path

    from .report import render_report

    pdf = render_report(Path(case_dir))
    digest = (pdf.parent / "report.pdf.sha256").read_text().split()[0]
    click.echo(f"wrote {pdf}")
    click.echo(f"  sha256 {digest}")


# --- verification (verify.py) ---


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--sample", default=4, show_default=True, help="Pairs to regenerate and compare (0: none).")
@click.option("--seed", default=0, show_default=True, help="Seed that picks the sample (recorded in the output).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def verify(case_dir, sample, seed, as_json):
    """Check a finished case: stored files, recomputed metrics, a regenerated sample.

    Exits non-zero when any check fails.

    \b
    Example:
        carlos-audit verify reports/demo --sample 4 --seed 1
    """
    from .errors import VerificationFailed
    from .verify import verify_case

    if sample:
        _quiet_libraries()
    result = verify_case(case_dir, sample=sample, seed=seed)
    if as_json:
        _print_json(result)
    else:
        width = max(len(c["check"]) for c in result["checks"])
        for c in result["checks"]:
            click.echo(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']:<{width}}  {c['detail']}")
        click.echo(f"sample: {sample} pairs, seed {seed}")
    if not result["ok"]:
        failed = [c["check"] for c in result["checks"] if not c["ok"]]
        raise VerificationFailed(f"verification failed: {', '.join(failed[:6])}")


# --- scale-out (engines/, plan) ---


@main.command("plan")
@click.argument("casefile", metavar="CASEFILE_OR_TEMPLATE", type=click.Path(dir_okay=False))
@click.option("--loras", "n_loras", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of LoRAs the corpus build will profile with this template.")
@click.option("--measure-images", type=click.IntRange(min=0), default=4, show_default=True,
              help="Images to generate (timed) with the template's base model and protocol on this device; 0: counts only.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object.")
def plan_command(casefile, n_loras, measure_images, as_json):
    """Images, UNet passes and device-hours of a corpus build, before starting it.

    Counts are exact for a build of N LoRAs with one shared base arm: (N + 1) x prompts x seeds
    images. Device time is measured: a few images are generated and CLIP-encoded on this device.

    \b
    Example:
        carlos-audit plan casefiles/demo.toml --loras 740 --measure-images 8
    """
    from .budget import plan

    _quiet_libraries()
    r = plan(casefile, n_loras, measure_images)
    if as_json:
        _print_json(r)
        return
    c = r["counts"]
    click.echo(f"build of {c['n_loras']} LoRAs x {c['n_prompts']} prompts x {c['n_seeds']} seeds "
               f"(batch {c['batch_size']}, {c['steps']} steps{', CFG' if c['cfg'] else ''})")
    click.echo(f"  images               {c['images']:>14,}  = (L + 1) x P x S  (base arm per LoRA: {c['images_if_base_per_lora']:,})")
    click.echo(f"  UNet forward calls   {c['unet_forward_calls']:>14,}  (one per step per batch)")
    click.echo(f"  UNet image-steps     {c['unet_image_steps']:>14,}  (latent evaluations {c['unet_latent_evaluations']:,})")
    click.echo(f"  VAE decodes          {c['vae_decoded_images']:>14,}")
    click.echo(f"  CLIP image encodings {c['clip_image_encodings']:>14,}")
    m, e = r["measurement"], r["estimate"]
    if m:
        click.echo(f"measured on {m['device']} ({m['dtype']}), {m['images']} images in {m['batches']} batches: "
                   f"{m['generation_s_per_image']:.4g} s/image generation, {m['clip_s_per_image']:.4g} s/image CLIP")
        click.echo(f"estimated device time: {e['device_hours']:.4g} device-hours "
                   f"(generation {e['generation_hours']:.4g} h, CLIP {e['clip_hours']:.4g} h; I/O, metrics not included)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
