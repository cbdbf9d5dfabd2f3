"""The ``qtool`` command group and the conventions its commands share.

Each command lives in its own module and imports heavy libraries only when run, so that ``qtool -h`` and
``qtool plan`` start without torch (bench/cli_startup.py measures them). Shared here:

- one error style: every failure, click's usage errors included, prints ``error: <message>`` and ``  -> <hint>`` on
  stderr and exits with the error's code (2 for usage errors; :mod:`qtool.errors` for the others);
- ``CONTEXT_SETTINGS`` (``-h``), :func:`table` (aligned columns), :func:`progress_bar` and :func:`byte_progress`
  (tqdm bars on stderr).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import time

import click

from qtool import __version__
from qtool.errors import QtoolError

_STARTED = time.perf_counter()  # ~ when the process started: this module loads first
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# command name -> "module:function"; loaded on demand.
_COMMANDS = {
    "convert": "qtool.cli.convert:convert_cmd",
    "verify": "qtool.cli.convert:verify_cmd",
    "plan": "qtool.cli.plan:plan_cmd",
    "train": "qtool.cli.train:train_cmd",
    "merge": "qtool.cli.merge:merge_cmd",
}


def table(rows: list[tuple], headers: tuple[str, ...], align: str = "") -> str:
    """``rows`` as columns under a dashed header, two spaces apart, as tabulate's "simple" format draws them (a column
    is at least its header + 2 wide; cells are shown with ``str``, numbers formatted by the caller). ``align``: "l" or
    "r" per column, "l" where missing. Used where start-up matters: importing tabulate costs ~40 ms
    (importlib.metadata, email, zipfile, ...)."""
    cells = [tuple(headers)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max([len(headers[i]) + 2] + [len(row[i]) for row in cells[1:]]) for i in range(len(headers))]
    sides = [align[i] if i < len(align) else "l" for i in range(len(headers))]

    def line(row) -> str:
        return "  ".join(c.rjust(w) if side == "r" else c.ljust(w) for c, w, side in zip(row, widths, sides)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


def progress_bar(total: int, desc: str, **options):
    """A tqdm bar on stderr, drawn only when stderr is a terminal and cleared when done. ``options`` go to tqdm."""
    from tqdm import tqdm

    # No monitor thread (it tunes miniters, which a bar set by hand does not use): `convert` forks a child early, and
    # a fork should copy a process with one thread.
    tqdm.monitor_interval = 0
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False, **options)


@contextlib.contextmanager
def byte_progress(desc: str):
    """A ``progress(done_bytes, total_bytes, name)`` callback drawing a bar on stderr (off when not a terminal)."""
    bar = progress_bar(0, desc, unit="B", unit_scale=True)

    def progress(done, total, name):
        bar.total, bar.n = total, done
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


class Failure(click.ClickException):
    """What every command prints when it fails: ``error: message`` and, if there is one, ``  -> hint``."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.hint, self.exit_code = hint, exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}" + (f"\n  -> {self.hint}" if self.hint else ""), file=file, err=True)


def _from_click(exc: click.UsageError) -> Failure:
    """click's own usage error (bad value, missing argument, unknown option) in qtool's style, naming the command
    whose help to read."""
    message = exc.format_message().strip().rstrip(".")
    if message[:2].istitle():  # "Invalid value ..." -> "invalid value ...", but "OUT ..." stays
        message = message[0].lower() + message[1:]
    where = exc.ctx.command_path if exc.ctx is not None else "qtool"
    return Failure(message, f"see {where} -h", exc.exit_code)


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(_COMMANDS)

    def get_command(self, ctx, name):
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:  # a command whose module is not built yet
            if exc.name == module:
                return None
            raise

    # Errors surface in two places: parsing the group's own arguments (make_context) and resolving, parsing and
    # running a command (invoke). click prints what is raised from here with Failure.show and exits with its code.
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:  # bare `qtool`: click prints the help
            raise
        except click.UsageError as exc:
            raise _from_click(exc) from None

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            if ctx.invoked_subcommand and sys.stderr.isatty():  # a person is watching: say how long it took
                click.echo(f"[qtool {ctx.invoked_subcommand}: {time.perf_counter() - _STARTED:.1f} s]", err=True)
            return result
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _from_click(exc) from None
        except QtoolError as exc:
            raise Failure(exc.message, exc.hint, exc.exit_code) from exc


@click.group("qtool", cls=_LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="qtool")
def main():
    """qtool — QLoRA toolkit: convert checkpoints to NF4, plan GPU memory, train LoRA, merge adapters.

    \b
    Examples:
      qtool convert ./Llama-2-7b-hf ./llama2-7b-nf4
      qtool plan --params 65e9 --rank 16
      qtool train ./llama2-7b-nf4 --data text.txt --steps 100 --out ./adapter
      qtool merge ./llama2-7b-nf4 ./adapter ./llama2-7b-merged
    """
