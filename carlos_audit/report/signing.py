"""A PAdES signature on the archive copy (pyHanko), and its verification.

    carlos-audit sign CASE_DIR --key KEY.pem --cert CERT.pem [--tsa URL]

writes ``report-archive-signed.pdf``: ``report-archive.pdf`` with a signature appended as an
incremental update, so the signed file begins with the archive copy's exact bytes (whose sha256
the filing copy prints). The filing copy ``report.pdf`` is never signed: a signature adds a form
field, which some courts' e-filing systems reject. A timestamp (RFC 3161) is added only when a
TSA URL is given, and that is the only time signing uses the network. Verification never
fetches anything: the signer's certificate is checked against the trust anchors given
(``verify --trust CERT.pem``), or reported as not checked.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from carlos_audit.errors import AuditError
from carlos_audit.fileio import write_bytes_atomic, write_text_atomic
from carlos_audit.hashing import sha256_bytes
from carlos_audit.report import ARCHIVE_PDF, SIGNED_PDF

PASSPHRASE_ENV = "CARLOS_AUDIT_KEY_PASSPHRASE"
FIELD = "CarlosAuditSignature"


def quiet_pyhanko() -> None:
    """pyHanko logs failed checks with tracebacks; the checks' results say what failed."""
    import logging

    for name in ("pyhanko", "pyhanko_certvalidator"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def sign_archive(case_dir: Path, key: Path, cert: Path, tsa: str | None = None) -> dict:
    """Sign the case's archive copy; returns {"signed": Path, "sha256", "archive_sha256", "signer"}."""
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import fields, signers

    quiet_pyhanko()
    case_dir = Path(case_dir)
    archive = case_dir / ARCHIVE_PDF
    if not archive.is_file():
        raise AuditError(f"{case_dir} has no {ARCHIVE_PDF}; render it first with `carlos-audit report {case_dir}`")
    for what, p in (("key", key), ("certificate", cert)):
        if not Path(p).is_file():
            raise AuditError(f"{what} file {p} does not exist")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    signer = signers.SimpleSigner.load(str(key), str(cert), key_passphrase=passphrase.encode() if passphrase else None)
    if signer is None:
        raise AuditError(f"cannot load the key {key} and certificate {cert} (PEM or DER; an encrypted key needs its passphrase in "
                         f"${PASSPHRASE_ENV})")
    timestamper = None
    if tsa:
        from pyhanko.sign.timestamps import HTTPTimeStamper

        timestamper = HTTPTimeStamper(tsa)
    data = archive.read_bytes()
    meta = signers.PdfSignatureMetadata(field_name=FIELD, md_algorithm="sha256", subfilter=fields.SigSeedSubFilter.PADES,
                                        reason="carlos-audit archive copy of the report", use_pades_lta=False)
    out = io.BytesIO()
    try:
        signers.PdfSigner(meta, signer=signer, timestamper=timestamper).sign_pdf(IncrementalPdfFileWriter(io.BytesIO(data)), output=out)
    except Exception as e:  # pyHanko raises many types (TSA unreachable, bad key usage, ...): one line for the user
        raise AuditError(f"signing failed: {type(e).__name__}: {str(e)[:300]}") from None
    signed = out.getvalue()
    write_bytes_atomic(case_dir / SIGNED_PDF, signed)
    write_text_atomic(case_dir / f"{SIGNED_PDF}.sha256", f"{sha256_bytes(signed)}  {SIGNED_PDF}\n")
    return {"signed": case_dir / SIGNED_PDF, "sha256": sha256_bytes(signed), "archive_sha256": sha256_bytes(data),
            "signer": signer.signing_cert.subject.human_friendly, "timestamped": bool(tsa)}


def verify_signature(case_dir: Path, trust: list[Path] | None = None) -> list[tuple[str, bool, str]]:
    """Checks of report-archive-signed.pdf: [(name, ok, detail)]; [] when there is none."""
    from pyhanko.keys import load_cert_from_pemder
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    case_dir = Path(case_dir)
    path = case_dir / SIGNED_PDF
    if not path.is_file():
        return []
    quiet_pyhanko()
    signed = path.read_bytes()
    checks = []
    archive = case_dir / ARCHIVE_PDF
    base = archive.read_bytes() if archive.is_file() else b""
    same = bool(base) and signed[:len(base)] == base
    checks.append(("signed archive copy", same, f"begins with the bytes of {ARCHIVE_PDF} (sha256 {sha256_bytes(base)[:16]}…)" if same
                   else f"does not begin with the bytes of {ARCHIVE_PDF}: it signs another document"))
    try:
        reader = PdfFileReader(io.BytesIO(signed))
        sigs = reader.embedded_signatures
    except Exception as e:  # a damaged file: the check fails, verify goes on
        return checks + [("signature", False, f"{SIGNED_PDF} cannot be read: {type(e).__name__}: {str(e)[:200]}")]
    if len(sigs) != 1:
        return checks + [("signature", False, f"{SIGNED_PDF} holds {len(sigs)} signatures; expected 1")]
    roots = [load_cert_from_pemder(str(p)) for p in trust or []]
    vc = ValidationContext(trust_roots=roots, allow_fetching=False)
    try:
        status = validate_pdf_signature(sigs[0], vc)
    except Exception as e:
        return checks + [("signature", False, f"cannot validate: {type(e).__name__}: {str(e)[:200]}")]
    whole = status.coverage is not None and status.coverage.name == "ENTIRE_FILE"
    ok = bool(status.intact and status.valid and whole)
    signer = status.signing_cert.subject.human_friendly if status.signing_cert else "?"
    detail = (f"intact, covers the whole file; signer {signer}" if ok
              else f"NOT VALID (intact {status.intact}, cryptographically valid {status.valid}, whole file {whole})")
    checks.append(("signature", ok, detail))
    if trust:
        checks.append(("signer certificate", bool(status.trusted),
                       "chains to a given trust anchor" if status.trusted else "does not chain to the given trust anchor(s)"))
    else:
        checks.append(("signer certificate", True, "not checked against a trust anchor (give --trust CERT.pem)"))
    return checks
