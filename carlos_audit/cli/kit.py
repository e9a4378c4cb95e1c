"""The opposing expert's kit: export, reproduce."""

from __future__ import annotations

import click

from carlos_audit.cli.common import fmt, main, print_json, quiet_libraries, safe_text


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The kit to write (default: <case folder>-kit.zip beside the case folder).")
@click.option("--include-inputs", is_flag=True,
              help="Put the input files (LoRA, comparison LoRAs, local base model or embedder, corpus) in the kit; "
                   "by default they are only listed by role, size and sha256.")
@click.option("--no-images", is_flag=True, help="Leave the case's images out (the CLIP features are always in).")
def export(case_dir, out, include_inputs, no_images):
    """Write a reproduction kit of a finished case: a deterministic zip for the other side.

    Case file (paths relative to the kit), prompt suite, manifest, metrics, comparison, the
    case's images and features, the report's sha256, tool version and git commit, the
    environment lock and a README. No absolute path of this machine is written.

    \b
    Example:
        carlos-audit export reports/demo --out demo-kit.zip
    """
    from pathlib import Path

    from carlos_audit.hashing import sha256_file
    from carlos_audit.kit.export import export_case

    src = Path(case_dir)
    dest = Path(out) if out else src.resolve().with_name(src.resolve().name + "-kit.zip")
    kit = export_case(src, dest, include_inputs=include_inputs, images=not no_images)
    click.echo(f"wrote {dest} ({len(kit['files']) + 1} files)")
    click.echo(f"  sha256 {sha256_file(dest)}")
    for i in kit["inputs"]:
        click.echo(f"  {i['role']:<20} {'included' if i['included'] else 'listed  '}  {safe_text(i['name'])}")


@main.command()
@click.argument("kit", type=click.Path(dir_okay=False))
@click.option("--lora", type=click.Path(dir_okay=False), default=None, help="The LoRA file (its sha256 must equal the kit's).")
@click.option("--base", default=None, help="The base model (file, folder or identifier) when the kit's is not embedded.")
@click.option("--embedder", type=click.Path(), default=None, help="The embedder's weights file when the kit's is a local file.")
@click.option("--comparison", multiple=True, type=click.Path(dir_okay=False),
              help="Each comparison LoRA of the case, in order (repeatable); without them the comparison arms are not reproduced.")
@click.option("--corpus", type=click.Path(file_okay=False), default=None,
              help="The reference corpus folder, to check the nearest neighbours too (with --all).")
@click.option("--sample", type=click.IntRange(min=1), default=8, show_default=True,
              help="Pairs to reproduce, stratified over the prompt categories (their whole batches are generated).")
@click.option("--all", "all_pairs", is_flag=True, help="Reproduce every pair (and check the conclusions).")
@click.option("--seed", default=0, show_default=True, help="Seed that draws the sample.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's own choice).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for the reproduction.")
@click.option("--force", is_flag=True, help="Replace a previous reproduction in --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print reproduction.json's summary as JSON.")
def reproduce(kit, out, all_pairs, no_progress, as_json, **options):
    """Repeat a case from its kit and report what matched: reproduction.json and reproduction.pdf.

    Inputs whose sha256 differ from the kit's are refused before anything is generated.

    \b
    Exit status: 0 identical, 4 within tolerance, 5 different, 1 refused or error.
    Example:
        carlos-audit reproduce demo-kit.zip --lora target.safetensors --out repro --sample 8
    """
    from carlos_audit.kit.reproduce import reproduce as run_reproduction

    quiet_libraries()
    request = dict(options)  # kit/reproduce.Reproduction: lora, base, embedder, corpus, sample, threads, force
    request["comparisons"], request["sample_seed"] = request.pop("comparison"), request.pop("seed")
    if all_pairs:
        request["sample"] = None
    r = run_reproduction(kit, out, progress=not no_progress, **request)
    s = r["summary"]
    if as_json:
        print_json({k: r[k] for k in ("verdict", "exit_status", "reasons", "summary", "conclusions")})
    else:
        click.echo(f"reproduction of case {safe_text(r['kit']['case'].get('id'))}: {r['verdict'].upper()}")
        click.echo(f"  pairs {s['pairs_compared']} of {s['pairs_in_case']}, arms {', '.join(s['arms'])}")
        click.echo(f"  images identical {s['images_identical']}/{s['images_compared']}, feature cosine min "
                   f"{fmt(s['feature_cosine_min'], '.8f')} (tolerance {s['feature_cosine_tolerance']})")
        m = r["metrics"]["main"]
        for key in ("strength", "consistency"):
            e = m[key]
            click.echo(f"  {key:<11} original {fmt(e['original'])}, reproduction {fmt(e['reproduction'])}, "
                       f"close {e['numerically_close']}, each inside the other's 95% CI: "
                       f"{e['original_in_reproduction_ci']}/{e['reproduction_in_original_ci']}")
        c = r["conclusions"]
        if c:
            click.echo(f"  percentiles unchanged {c['percentiles_unchanged']}, neighbours unchanged {c['neighbours_unchanged']}")
        env = r["environment"]
        click.echo(f"  environment: {len(env['differences'])} difference(s), {env['numeric_differences']} that can change numbers")
        for reason in r["reasons"]:
            click.echo(f"  - {reason}")
        click.echo(f"  wrote {out}/reproduction.json, {out}/reproduction.pdf")
    click.get_current_context().exit(r["exit_status"])
