"""What a run is asked for beyond its case file: the command line's switches, in one record.

The CLI builds a ``RunOptions`` once (``RunOptions.from_cli``) and the library passes it down
(pipeline -> run/profile -> run/load, run/devices_run) instead of threading each flag through
every signature. Library callers may still name single flags: ``RunOptions.given(None,
allow_partial=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RunOptions:
    force: bool = False                # replace a different case already in the output folder
    allow_partial: bool = False        # profile a LoRA although some of its modules were not applied (flagged)
    allow_unsafe_pickle: bool = False  # accept pickle-based files (.ckpt/.pt/.bin): they can execute code
    allow_download: bool = False       # download model weights from a hub (default: local cache only)
    allow_incompatible: bool = False   # compare with a reference corpus profiled differently
    progress: bool = True              # progress bars

    @classmethod
    def from_cli(cls, *, no_progress: bool = False, **flags) -> "RunOptions":
        """From click's option values (``--no-progress`` and the ``--allow-*`` / ``--force`` flags)."""
        return cls(progress=not no_progress, **flags)

    @classmethod
    def given(cls, options: "RunOptions | None" = None, **flags) -> "RunOptions":
        """``options`` (default: all off, progress on) with the single ``flags`` a caller names."""
        return replace(options or cls(), **flags)

    def command_flags(self) -> list[str]:
        """The flags a recorded command line carries to reproduce the run (manifest ``run.command``)."""
        return [f for f, on in (("--allow-partial", self.allow_partial), ("--allow-incompatible", self.allow_incompatible),
                                ("--allow-unsafe-pickle", self.allow_unsafe_pickle)) if on]
