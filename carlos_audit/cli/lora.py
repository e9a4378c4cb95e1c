"""LoRA intake and weight comparison: inspect, compare-weights."""

from __future__ import annotations

import click

from carlos_audit.cli.common import fmt, main, print_json, safe_text


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
    from carlos_audit.lora.fileformat import LoraFile
    from carlos_audit.lora.inspection import inspect_lora, weight_faults

    source = LoraFile(lora, allow_unsafe_pickle)
    r = inspect_lora(source, base_model_sha256=base_sha256)
    faults = weight_faults(source)
    if as_json:
        print_json({**r, "weight_faults": faults})
        return
    ranks, alphas = r["rank_summary"], r["alpha_summary"]
    evidence = r["architecture_evidence"]
    click.echo(f"file            {safe_text(r['path'], 200)}")
    click.echo(f"size            {r['size']} bytes")
    click.echo(f"sha256          {r['sha256']}")
    click.echo(f"autov2          {r['autov2']}")
    click.echo(f"payload sha256  {r['payload_sha256'] or '—'}  (AutoV3; unchanged by metadata edits)")
    click.echo(f"format          {r['format']}")
    click.echo(f"architecture    {r['architecture']}  ({evidence.get('rule')})")
    if r.get("layout"):  # FLUX.1, Z-Image: the family's key-map layout
        click.echo(_layout_line(r, evidence))
    click.echo(f"modules         {r['module_count']} ({r['parameter_count']} parameters)")
    for kind, f in r.get("families", {}).items():
        wd = f", {f['weight_decompose']} with weight decomposition" if f["weight_decompose"] and kind != "dora" else ""
        norm = fmt(f["delta_norm"]) if f["delta_norm"] is not None else "depends on the base weights"
        click.echo(f"family          {f['name']}: {f['modules']} modules{wd}; |dW| {norm}; scale: {f['scale_rule']}")
    click.echo(f"ranks           {', '.join(map(str, ranks['distinct'])) or '—'}")
    alpha_text = ", ".join(f"{a:g}" for a in alphas["distinct"]) or "—"
    if alphas["absent"]:
        alpha_text += f"  ({alphas['absent']} modules store none: alpha = rank)"
    click.echo(f"alphas          {alpha_text}")
    click.echo(f"|dW| total      {fmt(r['weight_norm_total'])}")
    if r.get("unrecognised_tensors"):
        click.echo(f"unrecognised    {len(r['unrecognised_tensors'])} tensors not part of any LoRA module")
    claim = r["claimed_base_model_hash"]
    claim_text = "none" if claim is None else f"{safe_text(claim['value'], 70)} ({claim['source']})"
    click.echo(f"base model hash claimed {claim_text}; check: {r['base_model_hash_check']}")
    _echo_faults(faults)
    click.echo("")
    click.echo("SELF-REPORTED metadata (unverified)")
    if not r["metadata"]:
        click.echo("  (none)")
    for key in sorted(r["metadata"]):
        click.echo(f"  {safe_text(key, 40)}: {safe_text(r['metadata'][key], 100, show_length=True)}")
    if r["trigger_word_hints"]:
        click.echo("")
        click.echo("Trigger word hints (from self-reported metadata)")
        for hint in r["trigger_word_hints"]:
            count = f", {hint['count']}x" if "count" in hint else ""
            click.echo(f"  {safe_text(hint['text'], 60)}  ({hint['source']}{count})")


def _echo_faults(faults: list[str]) -> None:
    """inspect's warnings for weights that are no trained weights (lora/inspection.weight_faults)."""
    for fault in faults:
        click.echo(f"WARNING         {safe_text(fault, 200)}")
    if faults:
        click.echo(f"WARNING         {len(faults)} weight fault(s): `run` and `check` refuse this file")


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
    from carlos_audit.lora.weights import compare_weights, weights_reading

    r = compare_weights(lora_a, lora_b)
    reading = weights_reading(r)
    if as_json:
        print_json({**r, "reading": reading})
        return
    for side in ("a", "b"):
        click.echo(f"{side.upper()}  {safe_text(r['path_' + side], 200)}")
        click.echo(f"   format {r['format_' + side]}  sha256 {r['sha256_' + side]}")
        click.echo(f"   payload sha256 {r['payload_sha256_' + side]}")
    click.echo(f"payload identical  {'yes' if r['payload_identical'] else 'no'}")
    click.echo(f"modules compared   {r['modules_compared']} (only in A: {len(r['modules_only_in_a'])}, "
               f"only in B: {len(r['modules_only_in_b'])}, skipped: {len(r['modules_skipped'])})")
    click.echo(f"cosine             {fmt(r['cosine'], '.6f')}  (over shared modules, norm-weighted)")
    click.echo(f"norm ratio |B|/|A| {fmt(r['norm_ratio'], '.6f')}")
    click.echo(f"reading            {reading}")
    click.echo("                   (an indicator from the weights alone, not a conclusion)")


def _layout_line(r: dict, evidence: dict) -> str:
    """The inspect line of a family layout: which trainer's names, and the blocks they touch."""
    if r["architecture"] == "zimage":
        declared = (f"; declared base {evidence['declared_variant']} (SELF-REPORTED, metadata {evidence['declared_by']})"
                    if evidence.get("declared_variant") else "; no base variant declared in its metadata")
        return (f"Z-Image layout  {r['layout']}; width {evidence.get('width')}; layers {_blocks(evidence.get('layers'))}, "
                f"noise refiner {_blocks(evidence.get('noise_refiner'))}, context refiner "
                f"{_blocks(evidence.get('context_refiner'))}{declared}")
    return (f"Flux layout     {r['layout']}; double-stream blocks {_blocks(evidence.get('double'))}, "
            f"single-stream blocks {_blocks(evidence.get('single'))}"
            + (f"; also {', '.join(evidence['other'])}" if evidence.get("other") else ""))


def _blocks(indices) -> str:
    """Block indices as ranges: [0, 1, 2, 5] -> "0-2, 5"; none -> "none"."""
    if not indices:
        return "none"
    runs, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ", ".join(runs)
