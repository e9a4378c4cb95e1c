"""What every command module shares: the top-level group, error mapping, printing helpers.

Only parsing, calling the library, printing and mapping errors to exit codes live in the CLI.
Heavy libraries (torch, diffusers, open_clip) are imported inside the commands that need them,
so ``carlos-audit --help`` answers at once.
"""

from __future__ import annotations

import json

import click

from carlos_audit import __version__
from carlos_audit.errors import AuditError, write_fault
from carlos_audit.report.text import visible


class AuditGroup(click.Group):
    """Turns AuditError (and a few OS errors) into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AuditError as e:
            click.echo(f"Error: {visible(e)}", err=True)  # a file name or value quoted in it: one visible line
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; run the same command again to resume.", err=True)
            ctx.exit(130)
        except OSError as e:  # a write outside fileio (a PDF, a library's own file): one line too
            fault = write_fault(e)
            if fault is None:
                raise
            click.echo(f"Error: {fault}", err=True)
            ctx.exit(fault.exit_code)


def route_warnings(verbose: bool) -> None:
    """Python warnings (a library's deprecation notice, say) go to the ``py.warnings`` logger:
    printed on stderr with --verbose, otherwise kept off the terminal, so that an error stays
    one line whatever versions a fresh install resolved."""
    import logging

    logging.captureWarnings(False)  # undo an earlier capture (whose saved showwarning may be stale)
    logging.captureWarnings(True)
    log = logging.getLogger("py.warnings")
    log.propagate = False
    log.setLevel(logging.WARNING)  # its own level: quiet_libraries() raises the root logger's to ERROR
    log.handlers[:] = [logging.StreamHandler() if verbose else logging.NullHandler()]


@click.group(cls=AuditGroup)
@click.version_option(__version__, prog_name="carlos-audit")
@click.option("--verbose", is_flag=True, help="Also print the libraries' warnings (otherwise kept off the terminal).")
def main(verbose: bool):
    """Audit a Stable Diffusion LoRA with the CARLoS representation.

    \b
    Example:
        carlos-audit demo
        carlos-audit run casefiles/demo.toml
    """
    route_warnings(verbose)


def case_folder_lock(writes: bool):
    """Decorator of a command on ``CASE_DIR``: a command that writes into the case folder holds its
    lock for its whole body (casefolder/lock.case_lock; a second holder refused in one line naming
    it); one that only reads is refused while a live run holds it (``refuse_if_held``)."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            from pathlib import Path

            from carlos_audit.casefolder.lock import case_lock, refuse_if_held

            out = Path(kwargs["case_dir"])
            if not writes:
                refuse_if_held(out)
                return fn(*args, **kwargs)
            with case_lock(out):
                return fn(*args, **kwargs)
        return command
    return wrap


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def safe_text(text, width: int = 40, *, show_length: bool = False) -> str:
    """Untrusted text (self-reported metadata, corpus names) made safe for one terminal line:
    control, format and other hidden characters shown as their code point (``<U+202E>``: the
    rule the PDF follows, report/text.visible), cut to width (the full text is in --json)."""
    s = visible("" if text is None else text)
    if len(s) <= width:
        return s
    return s[: width - 1] + (f"… ({len(s)} chars; see --json)" if show_length else "…")


def fmt(v, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


_run_options = [
    click.option("--out", type=click.Path(file_okay=False), default=None,
                 help="Output folder (default: reports/<case id>, or [output] dir)."),
    click.option("--force", is_flag=True, help="Replace a different case already in the output folder."),
    click.option("--allow-partial", is_flag=True, help="Profile a LoRA even if some of its modules were not applied (flagged)."),
    click.option("--allow-unsafe-pickle", is_flag=True, help="Accept pickle-based files (.ckpt/.pt/.bin): they can execute code."),
    click.option("--allow-download", is_flag=True, help="Allow downloading model weights from a hub (default: local cache only)."),
    click.option("--no-progress", is_flag=True, help="Hide progress bars."),
    click.option("--allow-incompatible", is_flag=True,
                 help="Compare with a reference corpus profiled differently (the report says so prominently)."),
]


def run_options(f):
    for opt in reversed(_run_options):
        f = opt(f)
    return f


def quiet_libraries():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "open_clip", "peft", "huggingface_hub", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def echo_checks(checks: list[dict]) -> None:
    """A list of {check, ok, detail} as PASS/FAIL lines, names aligned."""
    width = max((len(c["check"]) for c in checks), default=0)
    for c in checks:
        click.echo(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']:<{width}}  {visible(c['detail'])}")
