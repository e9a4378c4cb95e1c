"""The one exception type for problems a user can act on.

Raised where the problem is found, with a message fit to print on one line;
``cli.py`` turns it into ``Error: <message>`` on stderr and a non-zero exit.
"""


class AuditError(Exception):
    """A user-facing problem (bad input, refused evidence, failed check)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class VerificationFailed(AuditError):
    """A finished case did not pass verification."""

    exit_code = 3


#: errno values of a write the user can fix (space, a read-only mount, permissions, quota).
WRITE_FAULT_ERRNOS = {"ENOSPC": "no space left on the device", "EROFS": "the file system is read-only",
                      "EACCES": "permission denied", "EPERM": "operation not permitted",
                      "EDQUOT": "disk quota exceeded", "EFBIG": "file too large"}


class WriteFault(AuditError):
    """A file could not be written (full disk, read-only folder, permissions). What was written
    before stays valid: unit records are written last, atomically, so the run resumes."""

    exit_code = 4


def write_fault(error: BaseException, path=None) -> WriteFault | None:
    """The one-line WriteFault for an OSError a user can fix (``WRITE_FAULT_ERRNOS``), else None."""
    import errno as errno_mod

    if not isinstance(error, OSError) or error.errno is None:
        return None
    name = errno_mod.errorcode.get(error.errno, "")
    if name not in WRITE_FAULT_ERRNOS:
        return None
    where = path or error.filename
    return WriteFault(f"cannot write {where}: {WRITE_FAULT_ERRNOS[name]} ({name}); nothing half-written was kept: "
                      "free space or fix the folder, then run the same command again to resume")
