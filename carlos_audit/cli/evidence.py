"""Evidence on a finished case: analyse, report, verify."""

from __future__ import annotations

import click

from carlos_audit.cli.common import main, print_json, quiet_libraries


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
def report(case_dir):
    """Re-render report.pdf of a finished case from its stored results (generates nothing).

    \b
    Example:
        carlos-audit report reports/demo
    """
    from pathlib import Path

    from carlos_audit.report import render_report

    pdf = render_report(Path(case_dir))
    digest = (pdf.parent / "report.pdf.sha256").read_text().split()[0]
    click.echo(f"wrote {pdf}")
    click.echo(f"  sha256 {digest}")


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to write the recomputed metrics.json / comparison.json into (the case folder is never written).")
@click.option("--allow-incompatible", is_flag=True, help="Compare with a reference corpus profiled differently.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def analyse(case_dir, out, allow_incompatible, as_json):
    """Run the analysis step again on a finished case (no model): metrics and comparison from the
    stored features, compared byte for byte with the recorded results.

    Exits non-zero when a result differs.

    \b
    Example:
        carlos-audit analyse reports/demo
    """
    from pathlib import Path

    from carlos_audit.analysis.case_analysis import reanalyse
    from carlos_audit.errors import VerificationFailed

    result = reanalyse(Path(case_dir), allow_incompatible=allow_incompatible, out=Path(out) if out else None)
    if as_json:
        print_json(result)
    else:
        for name, r in sorted(result["results"].items()):
            click.echo(f"{'SAME' if r['identical'] else 'DIFF'}  {name}  sha256 {r['now']} (recorded {r['recorded']})")
    if not result["identical"]:
        raise VerificationFailed("the analysis does not reproduce the recorded results")


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
    from carlos_audit.errors import VerificationFailed
    from carlos_audit.verify import verify_case

    if sample:
        quiet_libraries()
    result = verify_case(case_dir, sample=sample, seed=seed)
    if as_json:
        print_json(result)
    else:
        width = max(len(c["check"]) for c in result["checks"])
        for c in result["checks"]:
            click.echo(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']:<{width}}  {c['detail']}")
        click.echo(f"sample: {sample} pairs, seed {seed}")
    if not result["ok"]:
        failed = [c["check"] for c in result["checks"] if not c["ok"]]
        raise VerificationFailed(f"verification failed: {', '.join(failed[:6])}")
