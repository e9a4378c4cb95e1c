"""The command line: a thin click layer over the library, one module per group of commands.

``main`` is the entry point (``carlos-audit``); importing the command modules registers their
commands on it.
"""

from carlos_audit.cli import cases, corpus, evidence, kit, lora  # noqa: F401  (registers the commands)
from carlos_audit.cli.common import main

__all__ = ["main"]
