"""Evidence on a finished case: analyse, report, preflight, sign, verify."""

from __future__ import annotations

import click

from carlos_audit.cli.common import case_folder_lock, echo_checks, main, print_json, quiet_libraries, safe_text


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--render-despite-integrity-failure", "despite", is_flag=True,
              help="Render even when the case folder fails the integrity check, with the failure printed on the cover.")
@case_folder_lock(writes=True)
def report(case_dir, despite):
    """Re-render both copies of the report from a case's stored results (generates nothing).

    report.pdf is the filing copy (PDF/A-2u, tagged, nothing embedded); report-archive.pdf the
    archive copy (PDF/A-3b with manifest.json, metrics.json, comparison.json embedded). The
    filing copy is pre-flight checked; a failure exits non-zero after writing the files.
    verify's integrity checks run first (the manifest's own hash, every stored and result file
    against the manifest, metrics recomputed from the embeddings): a folder that fails them is
    refused, unless --render-despite-integrity-failure.

    \b
    Example:
        carlos-audit report reports/demo
    """
    from pathlib import Path

    from carlos_audit.casefolder import CaseFolder
    from carlos_audit.errors import AuditError
    from carlos_audit.report.preflight import summary
    from carlos_audit.report.render import render_copies
    from carlos_audit.verify import require_intact

    failures = require_intact(CaseFolder(case_dir), despite=despite)
    r = render_copies(Path(case_dir), tuple(failures))
    for f in failures:
        click.echo(f"warning: integrity check failed, rendered on request with the failure on the cover: {f}", err=True)
    click.echo(f"wrote {r['filing']} (filing copy)")
    click.echo(f"  sha256 {r['filing_sha256']}")
    click.echo(f"wrote {r['archive']} (archive copy)")
    click.echo(f"  sha256 {r['archive_sha256']}")
    if not r["preflight"]["ok"]:
        raise AuditError(f"{r['filing']} fails the pre-flight check: {summary(r['preflight'])}")
    click.echo(f"pre-flight: {summary(r['preflight'])}")


@main.command()
@click.argument("pdf", type=click.Path(dir_okay=False))
@click.option("--max-mb", type=click.FloatRange(min=0, min_open=True), default=35.0, show_default=True,
              help="Size limit of the court's e-filing system, in MB (1,000,000 bytes).")
@click.option("--paper", type=click.Choice(["a4", "letter"]), default=None,
              help="Page size every page must have (default: all pages alike, A4 or letter).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def preflight(pdf, max_mb, paper, as_json):
    """Check a PDF for court e-filing: no attachments, scripts or form fields, text and fonts,
    page size, file size, tagged structure. Exits non-zero when a check fails.

    \b
    Example:
        carlos-audit preflight reports/demo/report.pdf --max-mb 35
    """
    from carlos_audit.errors import VerificationFailed
    from carlos_audit.report.preflight import preflight as run_preflight

    result = run_preflight(pdf, max_mb=max_mb, paper=paper)
    if as_json:
        print_json(result)
    else:
        echo_checks(result["checks"])
        for s in (result.get("sections") or [])[:5]:
            click.echo(f"      {s['bytes'] / 1e6:8.2f} MB  {safe_text(s['title'], 100)}")  # the PDF's own outline
        if result.get("advice"):
            click.echo(result["advice"])
    if not result["ok"]:
        failed = [c["check"] for c in result["checks"] if not c["ok"]]
        raise VerificationFailed(f"pre-flight failed: {', '.join(failed)}")


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Private key, PEM or DER "
              "(an encrypted key reads its passphrase from $CARLOS_AUDIT_KEY_PASSPHRASE).")
@click.option("--cert", required=True, type=click.Path(dir_okay=False), help="The signer's certificate, PEM or DER.")
@click.option("--tsa", default=None, help="URL of an RFC 3161 time-stamping authority (uses the network); default: no timestamp.")
@case_folder_lock(writes=True)
def sign(case_dir, key, cert, tsa):
    """Sign the archive copy (PAdES): writes report-archive-signed.pdf. The filing copy stays unsigned.

    \b
    Example:
        carlos-audit sign reports/demo --key expert-key.pem --cert expert-cert.pem
    """
    from carlos_audit.report.signing import sign_archive

    r = sign_archive(case_dir, key, cert, tsa)
    click.echo(f"wrote {r['signed']} (signed by {r['signer']}{', timestamped' if r['timestamped'] else ''})")
    click.echo(f"  sha256 {r['sha256']}; begins with report-archive.pdf (sha256 {r['archive_sha256']})")


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to write the recomputed metrics.json / comparison.json into (the case folder is never written).")
@click.option("--allow-incompatible", is_flag=True, help="Compare with a reference corpus profiled differently.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@case_folder_lock(writes=False)
def analyse(case_dir, out, allow_incompatible, as_json):
    """Run the analysis step again on a finished case (no model): metrics and comparison from the
    stored features, compared byte for byte with the recorded results and the files on disk.

    verify's integrity checks run first (the manifest's own hash, every stored and result file
    against the manifest). Each result file is SAME, EDITED (the file on disk is not what the
    analysis computes, and no intact record vouches for it), DIFF (the analysis does not
    reproduce it) or MISSING. Exits non-zero when a check fails or a result is not SAME.

    \b
    Example:
        carlos-audit analyse reports/demo
    """
    from pathlib import Path

    from carlos_audit.analysis.case_analysis import reanalyse
    from carlos_audit.casefolder import CaseFolder
    from carlos_audit.errors import VerificationFailed
    from carlos_audit.verify import integrity_checks, integrity_failures

    checks = integrity_checks(CaseFolder(case_dir).require_finished(), recompute=False)
    result = reanalyse(Path(case_dir), allow_incompatible=allow_incompatible, out=Path(out) if out else None)
    result["integrity"] = [c.as_dict() for c in checks]
    if as_json:
        print_json(result)
    else:
        echo_checks([c.as_dict() for c in checks if not c.ok])
        for name, r in sorted(result["results"].items()):
            click.echo(f"{r['status']}  {name}  sha256 {r['now']} (recorded {r['recorded']}, on disk {r['on_disk']})")
    problems = [f"{r['status'].lower()}: {name}" for name, r in sorted(result["results"].items()) if not r["identical"]]
    problems += [f"integrity check failed: {f}" for f in integrity_failures(checks)]
    if problems:
        statuses = {r["status"] for r in result["results"].values()}
        what = ("the analysis does not reproduce the recorded results" if "DIFF" in statuses else
                "result files on disk are not the ones the run wrote" if statuses - {"SAME"} else "the case folder is not intact")
        raise VerificationFailed(f"{what} ({'; '.join(problems[:4])})")


# --- verification (verify.py) ---


@main.command()
@click.argument("case_dir", type=click.Path(file_okay=False))
@click.option("--sample", default=4, show_default=True, help="Pairs to regenerate and compare (0: none).")
@click.option("--seed", default=0, show_default=True, help="Seed that picks the sample (recorded in the output).")
@click.option("--trust", multiple=True, type=click.Path(dir_okay=False),
              help="Certificate (PEM or DER) the signature of a signed archive copy must chain to; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@case_folder_lock(writes=False)
def verify(case_dir, sample, seed, trust, as_json):
    """Check a finished case: stored files, both report copies and a signature, recomputed metrics, a regenerated sample.

    Exits non-zero when any check fails.

    \b
    Example:
        carlos-audit verify reports/demo --sample 4 --seed 1
    """
    from pathlib import Path

    from carlos_audit.errors import VerificationFailed
    from carlos_audit.verify import verify_case

    if sample:
        quiet_libraries()
    result = verify_case(case_dir, sample=sample, seed=seed, trust=[Path(t) for t in trust])
    if as_json:
        print_json(result)
    else:
        echo_checks(result["checks"])
        click.echo(f"sample: {sample} pairs, seed {seed}")
    if not result["ok"]:
        failed = [c["check"] for c in result["checks"] if not c["ok"]]
        raise VerificationFailed(f"verification failed: {', '.join(failed[:6])}")
