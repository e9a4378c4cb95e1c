"""The door to a case folder: its layout and unit store (``store.py``), its lock (``lock.py``)
and ``CaseFolder`` (``folder.py``), the one reader of its result files."""
