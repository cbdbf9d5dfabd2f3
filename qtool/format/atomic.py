"""Outputs that appear complete or not at all.

Every output folder (converted checkpoint, adapter, merged model) is built under a hidden sibling name
``.NAME.qtool-partial-PID`` and renamed into place only when complete and checked. A run killed at any point leaves
at most such a partial folder, which never looks finished (the name says so) and which the next run removes.

Replacing an existing output (``--overwrite``) takes two renames — the old folder to ``.NAME.qtool-old-PID``, the new
one into place — and then removes the old one. A run killed between the two renames leaves NAME missing and its
previous contents under the old name: the next run for NAME moves them back (undoing the killed run, as every
failed run is undone) and says so; a run killed after them leaves an old folder that the next run removes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

from qtool.errors import OutputError

PARTIAL_TAG = ".qtool-partial-"
OLD_TAG = ".qtool-old-"
TEST_SLEEP_RENAME_ENV = "QTOOL_TEST_SLEEP_BETWEEN_RENAMES"  # test hook (seconds); unset: no effect


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_owner(p: Path) -> bool:
    """Whether the run that named folder ``p`` (``...-PID``) is gone."""
    pid = p.name.rsplit("-", 1)[-1]
    return not pid.isdigit() or not _pid_alive(int(pid))


def stale_partials(out: Path) -> list[Path]:
    """Partial folders of earlier runs for ``out`` whose process is gone."""
    out = Path(out)
    return [p for p in out.parent.glob(f".{out.name}{PARTIAL_TAG}*") if _dead_owner(p)]


def interrupted_replacements(out: Path) -> list[Path]:
    """``.NAME.qtool-old-PID`` folders of runs for ``out`` that were killed while replacing it, oldest first."""
    out = Path(out).absolute()
    return sorted((p for p in out.parent.glob(f".{out.name}{OLD_TAG}*") if p.is_dir() and _dead_owner(p)),
                  key=lambda p: p.stat().st_ctime)


def recover_interrupted(out: Path) -> None:
    """Clean up after killed runs for ``out`` (their process is gone): if ``out`` is missing, move the newest
    ``.NAME.qtool-old-PID`` back into place (with a RuntimeWarning saying so); remove the other old folders and the
    partial ones. Raises OutputError, naming the folder, if an old one cannot be moved back."""
    out = Path(out).absolute()
    olds = interrupted_replacements(out)
    if olds and not os.path.lexists(out):
        restore = olds.pop()
        try:
            os.rename(restore, out)
        except OSError as exc:
            raise OutputError(f"{restore} holds the previous {out.name}, left by a run that was killed while "
                              f"replacing it, and cannot be moved back ({exc.strerror})",
                              hint=f"move it back by hand (mv '{restore}' '{out}') or delete it, then run again") \
                from exc
        warnings.warn(f"{out}: restored from {restore.name}, where a run killed while replacing it had left it",
                      RuntimeWarning, stacklevel=3)
    for stale in olds + stale_partials(out):
        shutil.rmtree(stale, ignore_errors=True)


def check_destination(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is, contains or lies inside an input. First
    recovers from runs killed while replacing it (:func:`recover_interrupted`)."""
    recover_interrupted(out)
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputError(f"output {out} overlaps the input {src}; qtool never writes into its input",
                              hint="choose an output folder outside the input folder")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", hint="choose another folder, or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
    """Yield an empty staging folder beside ``out``; on normal exit move it to ``out`` (replacing an old ``out``
    only if ``overwrite``); on any exception remove it and leave ``out`` as it was."""
    out = Path(out).absolute()
    check_destination(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create {stage}: {exc.strerror}") from exc
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(stage)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}"
        os.rename(out, old)
        if os.environ.get(TEST_SLEEP_RENAME_ENV):  # test hook: a window to kill a run between the two renames
            import time

            time.sleep(float(os.environ[TEST_SLEEP_RENAME_ENV]))
    try:
        os.rename(stage, out)
    except OSError as exc:
        if old is not None:
            os.rename(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(f"cannot move the finished output into {out}: {exc.strerror}") from exc
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary name in the same folder, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}",
                          hint="free disk space and run again" if exc.errno == 28 else None) from exc
