"""Case runs: run, compare, demo, plan."""

from __future__ import annotations

import click

from carlos_audit.case.options import RunOptions
from carlos_audit.cli.common import (
    fmt,
    main,
    print_json,
    quiet_libraries,
    run_options,
    safe_text,
)


def _run(case, out, options: RunOptions, argv: list[str]):
    from carlos_audit.analysis.coverage import interval_warning
    from carlos_audit.case.casefile import output_dir
    from carlos_audit.check import require_filled
    from carlos_audit.pipeline import run_full

    require_filled(case)
    target = output_dir(case, out)
    quiet_libraries()
    result = run_full(case, target, options, argv=argv)
    m = result.metrics
    ci = m.ci
    cons = "null (" + m.consistency_note + ")" if m.consistency is None else f"{m.consistency:.4f}"
    click.echo(f"case {case.id}: {m.n_pairs} pairs -> {result.out}")
    click.echo(f"  strength    {m.strength:.4f}  95% CI [{ci['strength'][0]:.4f}, {ci['strength'][1]:.4f}]")
    if ci["consistency"]:
        cons += f"  95% CI [{ci['consistency'][0]:.4f}, {ci['consistency'][1]:.4f}]"
    click.echo(f"  consistency {cons}")
    warning = interval_warning(m.to_json())
    if warning:
        click.echo("Warning: " + warning, err=True)
    for h in (result.comparison.head_to_head if result.comparison else None) or []:
        b, w = h["behaviour"], h["weights"]
        ci = b["direction_cosine_ci"] or [None, None]
        click.echo(f"  vs {safe_text(h['lora']['file_name'])}: behaviour direction cosine {fmt(b['direction_cosine'])} "
                   f"[{fmt(ci[0])}, {fmt(ci[1])}]; weights cosine {fmt(w.get('cosine'))}, "
                   f"norm ratio {fmt(w.get('norm_ratio'))} ({w['reading']})")
        fm = b.get("direction_cosine_false_match")
        if fm:
            click.echo(f"    direction cosine >= {fm['similarity']:.3f} in {100 * (fm['unrelated_share'] or 0):.3g}% of "
                       f"unrelated corpus pairs ({fm['unrelated_at_least']} of {fm['unrelated_pairs']})"
                       + ("" if fm.get("comparable") else "; the corpus used another protocol"))
    for extra in result.written:
        click.echo(f"  wrote {extra}")


@main.command()
@click.argument("casefile", type=click.Path(dir_okay=False))
@run_options
@click.option("--rehash", is_flag=True, help="Read and hash every model file again (default: reuse a hash while "
                                            "the file's size, mtime, ctime and inode are unchanged).")
@click.option("--devices", default=None, metavar="LIST",
              help="Spread the case's generation over several devices of one class, one worker process each "
                   "(cuda:0,cuda:1,... or cpu,cpu); the case folder ends byte-identical to one device.")
def run(casefile, out, rehash, devices, **flags):
    """Profile the case's LoRA: paired generation, CLIP features, CARLoS metrics, report.

    \b
    Example:
        carlos-audit run casefiles/demo.toml
        carlos-audit run my_case.toml --out /evidence/case-17
    """
    from carlos_audit.case.casefile import load_case
    from carlos_audit.models.filehash import rehashing

    options = RunOptions.from_cli(**flags)
    argv = _argv("run", casefile, ["--rehash"] if rehash else [], out, options)
    case = load_case(casefile)
    with rehashing(rehash):
        if devices:
            from carlos_audit.case.casefile import output_dir
            from carlos_audit.run.devices_run import parse_devices, run_units_on_devices

            run_units_on_devices(case, output_dir(case, out), parse_devices(devices), options)
        _run(case, out, options, argv)


def _argv(command: str, casefile: str, extra: list[str], out, options: RunOptions) -> list[str]:
    """The command line recorded in the manifest: one that reproduces the run."""
    return ["carlos-audit", command, casefile] + extra + (["--out", out] if out else []) + options.command_flags()


@main.command()
@click.argument("casefile", type=click.Path(dir_okay=False))
@click.option("--with", "with_loras", multiple=True, type=click.Path(dir_okay=False),
              help="A comparison LoRA (repeatable), added to the case's [comparison] loras.")
@run_options
def compare(casefile, with_loras, out, **flags):
    """Head-to-head: the case's LoRA against comparison LoRAs, in behaviour and in weights.

    Runs the case (sharing its base arm with every comparison LoRA) and prints both analyses.

    \b
    Example:
        carlos-audit compare casefiles/demo.toml
        carlos-audit compare my_case.toml --with suspect_copy.safetensors
    """
    from carlos_audit.case.casefile import load_case

    case = load_case(casefile)
    if with_loras:
        case = _with_comparisons(case, with_loras)
    options = RunOptions.from_cli(**flags)
    argv = _argv("compare", casefile, [a for p in with_loras for a in ("--with", p)], out, options)
    _run(case, out, options, argv)


def _with_comparisons(case, loras):
    """The case with extra comparison LoRAs: a derived case file (absolute paths) stored in the
    tool's home, content-addressed; the user's case file and its folder are never written."""
    from pathlib import Path

    from carlos_audit.case.casefile import absolute_paths, derive_case
    from carlos_audit.errors import AuditError
    from carlos_audit.paths import carlos_home

    for p in loras:
        if not Path(p).is_file():
            raise AuditError(f"comparison LoRA {p} does not exist or is not a file")
    data = absolute_paths(case)
    data.setdefault("comparison", {}).setdefault("loras", [])
    data["comparison"]["loras"] += [str(Path(p).resolve()) for p in loras]
    return derive_case(data, carlos_home() / "derived-cases")


@main.command()
@click.option("--casefile", type=click.Path(dir_okay=False), default=None,
              help="Case file to run (default: casefiles/demo.toml of this checkout).")
@run_options
def demo(casefile, out, **flags):
    """Build the embedded tiny models and demo LoRAs, then run the demo case.

    \b
    Example:
        carlos-audit demo
    """
    from carlos_audit.case.casefile import load_case
    from carlos_audit.demo import DEMO_CASEFILE, prepare_demo, prepare_family_demo

    quiet_libraries()
    casefile = casefile or str(DEMO_CASEFILE)
    options = RunOptions.from_cli(**flags)
    # a family's demo (casefiles/demo-flux.toml, demo-zimage.toml: the registry says which), else the SD demo
    info = prepare_family_demo(load_case(casefile).base_model.source) or prepare_demo(progress=options.progress)
    click.echo(f"demo models, LoRAs{' and reference corpus' if 'corpus' in info else ''} ready in {info['home']}")
    argv = _argv("run", casefile, [], out, options)
    _run(load_case(casefile), out, options, argv)



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
    from carlos_audit.run.budget import plan

    quiet_libraries()
    r = plan(casefile, n_loras, measure_images)
    if as_json:
        print_json(r)
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
                   f"{m['generation_s_per_image']:.4g} s/image generation, {m['clip_s_per_image']:.4g} s/image CLIP, "
                   f"{m['host_chain_s_per_image']:.4g} s/image host chain (PNG, CLIP, hashes, writes)")
        click.echo(f"estimated device time: {e['device_hours']:.4g} device-hours "
                   f"(generation {e['generation_hours']:.4g} h, CLIP {e['clip_hours']:.4g} h); wall on one device "
                   f"{e['wall_hours_pipelined']:.4g} h pipelined ({e['wall_hours_serial']:.4g} h if the host chain "
                   "were serial; metrics not included)")


@main.command("check")
@click.argument("casefile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object.")
def check_command(casefile, as_json):
    """Check a case before spending GPU hours: inputs, corpus compatibility, plan. Loads no weights.

    Exit 0 only when `run` could start; otherwise each missing input is named with the command
    that supplies it.

    \b
    Example:
        carlos-audit check casefiles/carlos-sdxl.toml
    """
    from carlos_audit.check import check_case

    r = check_case(casefile)
    if as_json:
        print_json(r)
    else:
        click.echo(f"case {safe_text(r['case_id'], 60)}: {'ready to run' if r['ready'] else 'NOT ready'}")
        for it in r["inputs"]:
            where = it.get("path") or it.get("source") or ""
            click.echo(f"  {it['role']:<18} {it['status']:<9} {safe_text(where, 70)}")
            if it.get("status") in ("missing", "invalid") and it.get("detail"):
                click.echo(f"  {'':<18} {safe_text(it['detail'], 110)}")
            if it.get("supply"):
                click.echo(f"  {'':<18} supply: {it['supply']}")
        c = r["corpus"]
        if c and c["status"] == "present":
            click.echo(f"  corpus {safe_text(c['name'], 30)} ({c['n']} rows): "
                       + ("compatible" if c["compatible"] else "INCOMPATIBLE in " + ", ".join(c["differing"])))
            for f in c["fields"]:
                click.echo(f"    {f['field']:<18} {f['status']:<12} case {safe_text(f['case'], 44)}")
        p = r["plan"]
        click.echo(f"  plan: {p['n_arms']} arms x {p['n_prompts']} prompts x {p['n_seeds']} seeds = {p['images']:,} images, "
                   f"{p['unet_forward_calls']:,} UNet calls; device-hours: {p['device_hours_how']}")
        if r.get("sequential"):
            seq = r["sequential"]
            click.echo(f"  sequential: order seed {seq['rule']['order_seed']}, {seq['rule']['spending']} spending of "
                       f"alpha {seq['rule']['alpha']:g}; stops at the first look meeting every target")
            for look in seq["looks"]:
                click.echo(f"    look {look['look']}: {look['n_prompts']} prompts, {look['images']:,} images "
                           f"({look['share_of_protocol']:.0%} of the protocol)")
        for prob in r["problems"]:
            click.echo(f"  problem: {safe_text(prob, 160)}", err=True)
    if not r["ready"]:
        raise SystemExit(1)


@main.command("init")
@click.argument("lora", type=click.Path(dir_okay=False))
@click.option("--preset", type=click.Choice(["carlos-sdxl", "sd15", "flux-dev", "zimage-turbo", "zimage-base"]), default=None,
              help="Protocol (default: from the detected architecture; refused for other or mixed LoRAs).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Case file to write (default: ./<LoRA name>.toml).")
@click.option("--force", is_flag=True, help="Replace an existing case file.")
def init_command(lora, preset, out, force):
    """Write a ready case file for LORA: sha256 pinned, preset from its architecture, self-reported
    trigger words proposed (commented), placeholders for examiner and question.

    \b
    Example:
        carlos-audit init disputed.safetensors --out cases/disputed.toml
    """
    from carlos_audit.case.init import init_case

    r = init_case(lora, preset=preset, out=out, force=force)
    click.echo(f"wrote {r['casefile']} (preset {r['preset']}, {r['architecture']} LoRA, sha256 {r['sha256'][:16]}...)")
    if r["trigger_hints"]:
        click.echo("  SELF-REPORTED trigger words proposed (commented out): "
                   + ", ".join(safe_text(h["text"], 30) for h in r["trigger_hints"][:5]))
    click.echo("  fill in case.examiner and case.question, then: carlos-audit check " + r["casefile"])
