"""The door to a case folder: ``CaseFolder`` (``folder.py``), the one reader of its result files
and the one answer to "is this a finished case folder?"; its layout and unit store
(``store.py``), its lock (``lock.py``) and the inputs a run in it is bound to (``binding.py``)."""

from carlos_audit.casefolder.folder import CaseFolder

__all__ = ["CaseFolder"]
