"""The ``qtool`` command group. Each command lives in its own module and imports heavy libraries only when run,
so that ``qtool -h`` and ``qtool plan`` start without torch."""
from __future__ import annotations

import contextlib
import importlib
import sys

import click

from qtool import __version__
from qtool.errors import QtoolError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# command name -> "module:function"; loaded on demand.
_COMMANDS = {
    "convert": "qtool.cli.convert:convert_cmd",
    "verify": "qtool.cli.convert:verify_cmd",
    "plan": "qtool.cli.plan:plan_cmd",
    "train": "qtool.cli.train:train_cmd",
    "merge": "qtool.cli.merge:merge_cmd",
}


@contextlib.contextmanager
def byte_progress(desc: str):
    """A ``progress(done_bytes, total_bytes, name)`` callback drawing a bar on stderr (off when not a terminal)."""
    from tqdm import tqdm

    # No monitor thread (it tunes miniters, which a bar set by hand does not use): `convert` forks a child early, and
    # a fork should copy a process with one thread.
    tqdm.monitor_interval = 0
    bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=None, leave=False)

    def progress(done, total, name):
        bar.total, bar.n = total, done
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


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

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QtoolError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_LazyGroup, context_settings=CONTEXT_SETTINGS)
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
