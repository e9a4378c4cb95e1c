"""The door to a case folder: ``CaseFolder`` (``folder.py``), the one reader of its result files
and the one answer to "is this a finished case folder?"; its layout and unit store
(``store.py``) and its lock (``lock.py``)."""

from carlos_audit.casefolder.folder import CaseFolder

__all__ = ["CaseFolder"]
