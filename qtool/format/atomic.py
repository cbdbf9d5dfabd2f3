"""Outputs that appear complete or not at all.

Every output folder (converted checkpoint, adapter, merged model) is built under a hidden sibling name
``.NAME.qtool-partial-PID`` and renamed into place only when complete and checked. A run killed at any point leaves
at most such a partial folder, which never looks finished (the name says so) and which the next run removes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from qtool.errors import OutputError

PARTIAL_TAG = ".qtool-partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(out: Path) -> list[Path]:
    """Partial folders of earlier runs for ``out`` whose process is gone."""
    out = Path(out)
    found = []
    for p in out.parent.glob(f".{out.name}{PARTIAL_TAG}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            found.append(p)
    return found


def check_destination(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is, contains or lies inside an input."""
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
    for stale in stale_partials(out):
        shutil.rmtree(stale, ignore_errors=True)
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
        old = out.parent / f".{out.name}.qtool-old-{os.getpid()}"
        os.rename(out, old)
    os.rename(stage, out)
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
