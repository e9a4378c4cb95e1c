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
