"""The opposing expert's kit: export a finished case (export.py), reproduce it elsewhere
(reproduce.py), compare the two (compare.py), and the reproduction's PDF (document.py)."""
